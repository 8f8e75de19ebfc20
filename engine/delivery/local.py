"""Local and virtual mailbox delivery agents (Postfix's local(8) and virtual(8)).

``local``: the recipient's local part (lower-cased, minus a ``recipient_delimiter`` extension)
must be a user in the passwd database (Postfix's default local_recipient_maps); the mailbox is
``home_mailbox`` under the user's home (Maildir when it ends in "/"), else
``mail_spool_directory``/user as mbox. ``virtual``: ``virtual_mailbox_maps`` maps the address
(or ``@domain``) to a path under ``virtual_mailbox_base`` ("/" at the end = Maildir), owned by
``virtual_uid_maps`` / ``virtual_gid_maps``.

A local recipient first goes through ``alias_maps`` and the user's ``.forward``
(engine.delivery.aliases decides where its copies go): mailboxes, files, ``|commands`` (run by
/bin/sh with the message on their input, sysexits as pipe(8): 75 defers), and addresses that
are not local, which are forwarded as one new message (through cleanup, with a Delivered-To:
header naming the recipient, so that a copy coming back is a loop, 5.4.6). The recipient's one
result sums up its destinations: deferred if any deferred, bounced if any failed, else sent.

When Tern runs as root, the file is written by a forked child that takes the recipient's uid
and gid before it opens anything (a command runs with that uid and gid), never by changing the
server's own identity; otherwise the write runs in a mailbox thread as Tern's own user
(engine.delivery.writer).
"""

import functools
import os
import pwd
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.cleanup import RecipientRequest
from engine.config import Config
from engine.delivery import DeliveryOutcome, DeliveryRequest, RecipientResult, split_local
from engine.delivery.aliases import Expander, Rights, Target
from engine.delivery.mailbox import (
    MailboxError,
    Privileges,
    deliver_maildir,
    deliver_mbox,
    delivery_headers,
    mbox_entry,
    unix_lines,
)
from engine.delivery.pipe import SYSEXITS, output_text, run_command
from engine.delivery.writer import as_user, in_thread
from engine.tables import TableError, open_table

WRITE_TIME_LIMIT = 60.0  # seconds for a child's write, beyond its locks' patience

# the virtual tables, read once per process (as Postfix's texthash at process start)
_table = functools.lru_cache(maxsize=16)(open_table)


@dataclass(frozen=True)
class Mailbox:
    """Where one recipient's copy goes, and as whom it is written."""

    path: str
    maildir: bool
    uid: int
    gid: int
    spool: str = ""  # the mail_spool_directory holding this mbox ("" elsewhere)


def local_mailbox(recipient: str, config: Config) -> Mailbox:
    """The passwd user's mailbox. Raises MailboxError 5.1.1 for an unknown user."""
    user = split_local(recipient, config.recipient_delimiter)[0].lower()
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise MailboxError("5.1.1", f'unknown user: "{user}"') from None
    return user_mailbox(entry, config)


def user_mailbox(entry: pwd.struct_passwd, config: Config) -> Mailbox:
    """Where passwd user ``entry``'s mail goes: home_mailbox, else mail_spool_directory."""
    user = entry.pw_name
    if config.home_mailbox:
        path = os.path.join(entry.pw_dir, config.home_mailbox)
        return Mailbox(path, config.home_mailbox.endswith("/"), entry.pw_uid, entry.pw_gid)
    spool = config.mail_spool_directory
    return Mailbox(os.path.join(spool, user) + ("/" if spool.endswith("/") else ""),
                   spool.endswith("/"), entry.pw_uid, entry.pw_gid, spool)


async def virtual_mailbox(recipient: str, config: Config) -> Mailbox:
    """The virtual_mailbox_maps entry for the address, else for ``@domain``; its owner from
    virtual_uid_maps / virtual_gid_maps. Raises MailboxError 5.1.1 for an unknown address."""
    address = recipient.lower()
    keys = (address, "@" + address.rpartition("@")[2])
    maps = _table(config.virtual_mailbox_maps) if config.virtual_mailbox_maps else None
    relative = None
    for key in keys if maps else ():
        if (relative := await maps.lookup(key)) is not None:
            break
    if relative is None:
        raise MailboxError("5.1.1", f'unknown user: "{address}"')
    ids = []
    for name, spec in (("virtual_uid_maps", config.virtual_uid_maps),
                       ("virtual_gid_maps", config.virtual_gid_maps)):
        value = None
        for key in keys if spec else ():
            if (value := await _table(spec).lookup(key)) is not None:
                break
        if value is None or not value.strip().isdigit():
            raise MailboxError("4.3.5", f"{name}: no valid id for {address}")
        ids.append(int(value))
    if ids[0] < config.virtual_minimum_uid:
        raise MailboxError("4.3.5", f"virtual_uid_maps: uid {ids[0]} for {address} is below "
                                    f"virtual_minimum_uid {config.virtual_minimum_uid}")
    base = config.virtual_mailbox_base
    path = os.path.normpath(os.path.join(base, relative.lstrip("/")))
    if not path.startswith(os.path.normpath(base) + os.sep):
        raise MailboxError("4.3.5", f"virtual_mailbox_maps: {relative!r} leaves "
                                    f"virtual_mailbox_base")
    return Mailbox(path, relative.endswith("/"), ids[0], ids[1])


async def write_mailbox(mailbox: Mailbox, data: bytes, config: Config,
                        file: bool = False) -> None:
    """Write with the mailbox owner's identity: in a forked child that becomes that uid/gid
    when Tern is root and the owner is someone else, else in a mailbox thread as Tern itself
    (engine.delivery.writer: neither holds a thread of the loop's default executor).
    ``file``: an alias or .forward file destination, not a mailbox: any file its rights may
    write, a device such as /dev/null too (local(8)'s deliver_file checks no owner)."""
    locking = (config.deliver_lock_attempts, config.deliver_lock_delay)
    root = os.geteuid() == 0
    if mailbox.maildir:
        write, args = deliver_maildir, (mailbox.path, data)
    else:  # as root, a mailbox must be the recipient's own (strict_mailbox_ownership)
        write = functools.partial(deliver_mbox, regular_only=not file)
        args = (mailbox.path, data, *locking, mailbox.uid if root and not file else None)
    if not root or mailbox.uid == 0:
        await in_thread(write, *args)
        return
    privileges = None
    if mailbox.spool and not mailbox.maildir:
        privileges = spool_privileges(mailbox)
        args = (*args, privileges)
    # the locks' patience, plus a minute for the write itself
    await as_user(mailbox.uid, mailbox.gid, WRITE_TIME_LIMIT + locking[0] * locking[1],
                  write, *args,
                  privileges=privileges, mbox=None if mailbox.maildir else mailbox.path)


@dataclass(frozen=True)
class SpoolPrivileges(Privileges):
    """The identities of an mbox delivery into the mail spool directory, as Postfix's local(8)
    picks them: the recipient's own in a world-writable spool; the recipient's uid with the
    spool's group in a group-writable one (Debian's /var/mail, 2775 root:mail), so the dotlock
    can be made there; root otherwise, the new file then given to the recipient. The message
    itself is always appended as the recipient. Used in the forked child only."""

    uid: int
    gid: int
    spool_uid: int
    spool_gid: int

    @property
    def chown(self) -> tuple[int, int] | None:
        return None if self.spool_uid == self.uid else (self.uid, self.gid)

    def enter(self) -> None:
        """From root: the locking identity, keeping what ``writing`` and ``locking`` switch
        between as saved ids (root stays the real uid only when root locks)."""
        os.setgroups([])
        if self.spool_uid == 0:
            os.setgid(0)
        else:
            os.setresgid(self.gid, self.spool_gid, self.spool_gid)
            os.setresuid(self.uid, self.uid, self.uid)

    def locking(self) -> None:
        if self.spool_uid == 0:
            os.seteuid(0)
        os.setegid(self.spool_gid)

    def writing(self) -> None:
        os.setegid(self.gid)
        if self.spool_uid == 0:
            os.seteuid(self.uid)


def spool_privileges(mailbox: Mailbox) -> SpoolPrivileges:
    """Postfix's rule (local/mailbox.c): world-writable spool (or none to stat) → the
    recipient; group-writable → recipient uid + spool gid; else root."""
    try:
        info = os.stat(mailbox.spool)
    except OSError:
        return SpoolPrivileges(mailbox.uid, mailbox.gid, mailbox.uid, mailbox.gid)
    if info.st_mode & stat.S_IWOTH:
        return SpoolPrivileges(mailbox.uid, mailbox.gid, mailbox.uid, mailbox.gid)
    if info.st_mode & stat.S_IWGRP:
        return SpoolPrivileges(mailbox.uid, mailbox.gid, mailbox.uid, info.st_gid)
    return SpoolPrivileges(mailbox.uid, mailbox.gid, 0, 0)


# engine.cleanup.Cleanup.inject: queues a new message (sender, recipients, content)
Inject = Callable[..., Awaitable[object]]


async def deliver(request: DeliveryRequest, config: Config, virtual: bool = False,
                  inject: Inject | None = None) -> DeliveryOutcome:
    """Each recipient's copies (each with its own Delivered-To); one result each. ``inject``
    queues forwarded copies (without it, an alias to a remote address defers)."""
    relay = "virtual" if virtual else "local"
    body = unix_lines(request.content)
    delivered_to = _delivered_to(body)
    results = []
    warnings: list[str] = []
    for recipient in request.recipients:
        try:
            if recipient.lower() in delivered_to:  # local(8)'s loop check
                raise MailboxError("5.4.6", f"mail forwarding loop for {recipient}")
            if virtual:
                mailbox = await virtual_mailbox(recipient, config)
                reply = await _to_mailbox(mailbox, request.sender, recipient, body, config)
            else:
                reply = await _deliver_local(recipient, request, body, config, inject,
                                             warnings)
        except MailboxError as exc:
            status = "deferred" if exc.transient else "bounced"
            results.append(RecipientResult(recipient, status, exc.dsn, exc.text, relay))
            continue
        results.append(RecipientResult(recipient, "sent", "2.0.0", reply, relay))
    return DeliveryOutcome(results, warnings=warnings)


async def _to_mailbox(mailbox: Mailbox, sender: str, recipient: str, body: bytes,
                      config: Config) -> str:
    data = delivery_headers(sender, recipient) + body
    if not mailbox.maildir:
        data = mbox_entry(sender, data)
    await write_mailbox(mailbox, data, config)
    return "delivered to maildir" if mailbox.maildir else "delivered to mailbox"


async def _deliver_local(recipient: str, request: DeliveryRequest, body: bytes,
                         config: Config, inject: Inject | None, warnings: list[str]) -> str:
    """The recipient's expansion (aliases, .forward), every destination delivered; the
    reply of the one result, or MailboxError summing up what failed. What the expansion
    warns of goes to ``warnings``."""
    try:  # off the loop: it reads .forward and include files (engine.delivery.userfile)
        expansion = await in_thread(Expander(config).expand, recipient)
    except TableError:
        raise MailboxError("4.3.0", "alias database unavailable") from None
    warnings += expansion.warnings
    deferred = [(what, error) for what, error in expansion.failures if error.transient]
    if deferred:  # nothing delivered now: a retry expands again and would deliver the
        raise _failed(deferred, expansion.targets, recipient, config)  # rest once more
    replies: list[str] = []
    failures = [(what, error) for what, error in expansion.failures]
    forwards = [t.value for t in expansion.targets if t.kind == "forward"]
    for target in expansion.targets:
        if target.kind == "forward":
            continue
        try:
            replies.append(await _deliver_target(target, recipient, request, body, config))
        except MailboxError as exc:
            failures.append(("|" * (target.kind == "command") + target.value, exc))
    if forwards:
        try:
            replies.append(await _forward(forwards, recipient, expansion.sender, request,
                                          inject))
        except MailboxError as exc:
            failures.append((", ".join(forwards), exc))
    if failures:
        raise _failed(failures, expansion.targets, recipient, config)
    return "; ".join(replies)


def _failed(failures: list[tuple[str, MailboxError]], targets: list[Target], recipient: str,
            config: Config) -> MailboxError:
    """One error summing up what failed: deferred if anything was temporary."""
    deferred = [(w, e) for w, e in failures if e.transient]
    dsn = (deferred or failures)[0][1].dsn
    if len(failures) == 1 and _unaliased(targets, failures[0][0], recipient, config):
        return MailboxError(dsn, failures[0][1].text)  # as Postfix: no "expanded from"
    return MailboxError(dsn, "; ".join(f"{what} (expanded from <{recipient}>): {error.text}"
                                       for what, error in failures))


def _unaliased(targets: list[Target], failed: str, recipient: str, config: Config) -> bool:
    """Whether what ``failed`` is the recipient itself: nothing expanded (the failure is the
    address), or its one destination is its own mailbox (no alias, or ``name: name``)."""
    if not targets:
        return failed == recipient
    local = split_local(recipient, config.recipient_delimiter)[0].lower()
    return (len(targets) == 1 and targets[0].kind == "mailbox"
            and failed == targets[0].value == local)


async def _deliver_target(target: Target, recipient: str, request: DeliveryRequest,
                          body: bytes, config: Config) -> str:
    if target.kind == "mailbox":
        mailbox = user_mailbox(pwd.getpwnam(target.value), config)
        return await _to_mailbox(mailbox, request.sender, recipient, body, config)
    rights = _privs(target.rights, config)
    head = (f"Return-Path: <{request.sender}>\nX-Original-To: {recipient}\n"
            f"Delivered-To: {recipient}\n").encode()
    if target.kind == "file":  # local(8): an mbox file, or a Maildir for a name ending in "/"
        maildir = target.value.endswith("/")
        data = head + body if maildir else mbox_entry(request.sender, head + body)
        await write_mailbox(Mailbox(target.value, maildir, rights.uid, rights.gid), data,
                            config, file=True)
        return f"delivered to file: {target.value}"
    return await _command(target, recipient, request, head + body, config)


def _privs(rights: Rights, config: Config) -> Rights:
    """Root's rights never run a command or write a file: uid 0 becomes default_privs' uid,
    gid 0 its gid (local(8)'s command.c and file.c), so a root-owned alias or root's own
    .forward runs as default_privs."""
    if rights.uid and rights.gid:
        return rights
    try:
        privs = pwd.getpwnam(config.default_privs)
    except KeyError:
        raise MailboxError("4.3.5", "mail system configuration error") from None
    if rights.uid == 0:
        return Rights(privs.pw_uid, rights.gid or privs.pw_gid, privs.pw_name,
                      privs.pw_dir or "/")
    return Rights(rights.uid, privs.pw_gid, rights.name, rights.home)


async def _command(target: Target, recipient: str, request: DeliveryRequest, data: bytes,
                   config: Config) -> str:
    """``|command``: /bin/sh -c, its rights' uid and gid (when Tern is root), in their home,
    the message (after a "From " line) on its input; sysexits decide, as pipe(8)."""
    rights = _privs(target.rights, config)
    local, extension, domain = split_local(recipient, config.recipient_delimiter)
    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "LANG": "C", "HOME": rights.home,
           "USER": rights.name, "LOGNAME": rights.name, "SENDER": request.sender,
           "RECIPIENT": recipient, "ORIGINAL_RECIPIENT": recipient, "LOCAL": local,
           "EXTENSION": extension, "DOMAIN": domain}
    # command.c: every exported value censored through command_expansion_filter
    env = {name: _censor(value) for name, value in env.items()}
    identity: dict = {"cwd": rights.home}  # entered with the rights (run_command), or "/"
    if os.geteuid() == 0:
        identity.update(user=rights.uid, group=rights.gid)
    stamp = time.asctime()
    data = f"From {request.sender or 'MAILER-DAEMON'}  {stamp}\n".encode() + data
    command = target.value
    try:
        status, output = await run_command(["/bin/sh", "-c", command], data, env, identity,
                                           config.command_time_limit)
    except OSError as exc:
        raise MailboxError("4.3.0", f"cannot run command: {exc.strerror}") from None
    said = output_text(output)
    tail = f". Command output: {said}" if said else ""
    if status is None:
        raise MailboxError("4.3.0", f"Command time limit exceeded: {command}{tail}")
    if status == 0:
        return f"delivered to command: {command}"
    if status < 0:
        raise MailboxError("4.3.0", f"Command died with signal {-status}: {command}{tail}")
    dsn, text = SYSEXITS.get(status, ("5.3.0", f"Command died with status {status}"))
    raise MailboxError(dsn, f"{text}: {command}{tail}")


# Postfix's command_expansion_filter default: what a value exported to a command may hold
_COMMAND_FILTER = frozenset("1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyz"
                            "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _censor(value: str) -> str:
    """Each character outside the filter becomes "_" (a sender address can hold shell
    metacharacters and line ends, which a careless script would run)."""
    return "".join(c if c in _COMMAND_FILTER else "_" for c in value)


async def _forward(addresses: list[str], recipient: str, owner: str | None,
                   request: DeliveryRequest, inject: Inject | None) -> str:
    """One new message to the non-local ``addresses``, from the sender (or the owner- alias),
    marked Delivered-To the recipient (local(8)'s forward, prepend_delivered_header). The DSN
    request goes along as local(8) passes it: NOTIFY without SUCCESS (this host reports that
    the alias was expanded); ORCPT, RET and ENVID only when the sender is kept (a mailing list
    with an owner- alias starts afresh)."""
    if inject is None:
        raise MailboxError("4.3.0", "forwarding is not available in this process")
    content = f"Delivered-To: {recipient}\r\n".encode() + request.content
    notify = request.notify.get(recipient, "")
    if notify:
        kept = [n for n in notify.split(",") if n.strip().upper() != "SUCCESS"]
        notify = ",".join(kept) or "NEVER"
    keep = owner is None
    orcpt = request.orcpt.get(recipient, "") if keep else ""
    try:
        queued = await inject(request.sender if keep else owner,
                              [RecipientRequest(a, notify, orcpt) for a in addresses], content,
                              smtputf8=request.smtputf8, ret=request.ret if keep else "",
                              envid=request.envid if keep else "")
    except Exception as exc:  # noqa: BLE001 - spool full, I/O: the recipient is retried
        raise MailboxError("4.3.0", f"cannot forward: {exc}") from None
    return f"forwarded as {queued.queue_id}"


def _delivered_to(message: bytes) -> set[str]:
    """The addresses of the Delivered-To headers already in the message (lower case)."""
    header = message.split(b"\n\n", 1)[0]
    return {line[13:].strip().decode("utf-8", "replace").lower()
            for line in header.split(b"\n") if line[:13].lower() == b"delivered-to:"}
