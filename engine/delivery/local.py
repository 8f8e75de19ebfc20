"""Local and virtual mailbox delivery agents (Postfix's local(8) and virtual(8)).

``local``: the recipient's local part (lower-cased, minus a ``recipient_delimiter`` extension)
must be a user in the passwd database (Postfix's default local_recipient_maps); the mailbox is
``home_mailbox`` under the user's home (Maildir when it ends in "/"), else
``mail_spool_directory``/user as mbox. ``virtual``: ``virtual_mailbox_maps`` maps the address
(or ``@domain``) to a path under ``virtual_mailbox_base`` ("/" at the end = Maildir), owned by
``virtual_uid_maps`` / ``virtual_gid_maps``.

When Tern runs as root, the file is written by a forked child that takes the recipient's uid
and gid before it opens anything, never by changing the server's own identity; otherwise the
write runs in a mailbox thread as Tern's own user (engine.delivery.writer).
"""

import functools
import os
import pwd
import stat
from dataclasses import dataclass

from engine.config import Config
from engine.delivery import DeliveryOutcome, DeliveryRequest, RecipientResult, split_local
from engine.delivery.mailbox import (
    MailboxError,
    Privileges,
    deliver_maildir,
    deliver_mbox,
    delivery_headers,
    mbox_entry,
    unix_lines,
)
from engine.delivery.writer import as_user, in_thread
from engine.tables import open_table

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


async def write_mailbox(mailbox: Mailbox, data: bytes, config: Config) -> None:
    """Write with the mailbox owner's identity: in a forked child that becomes that uid/gid
    when Tern is root and the owner is someone else, else in a mailbox thread as Tern itself
    (engine.delivery.writer: neither holds a thread of the loop's default executor)."""
    locking = (config.deliver_lock_attempts, config.deliver_lock_delay)
    root = os.geteuid() == 0
    if mailbox.maildir:
        write, args = deliver_maildir, (mailbox.path, data)
    else:  # as root, the mailbox must be the recipient's own (strict_mailbox_ownership)
        write, args = deliver_mbox, (mailbox.path, data, *locking, mailbox.uid if root else None)
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


async def deliver(request: DeliveryRequest, config: Config, virtual: bool = False
                  ) -> DeliveryOutcome:
    """Each recipient's copy (with its own Delivered-To) into its mailbox; one result each."""
    relay = "virtual" if virtual else "local"
    body = unix_lines(request.content)
    delivered_to = _delivered_to(body)
    results = []
    for recipient in request.recipients:
        try:
            if recipient.lower() in delivered_to:  # local(8)'s loop check
                raise MailboxError("5.4.6", f"mail forwarding loop for {recipient}")
            if virtual:
                mailbox = await virtual_mailbox(recipient, config)
            else:
                mailbox = local_mailbox(recipient, config)
            data = delivery_headers(request.sender, recipient) + body
            if not mailbox.maildir:
                data = mbox_entry(request.sender, data)
            await write_mailbox(mailbox, data, config)
        except MailboxError as exc:
            status = "deferred" if exc.transient else "bounced"
            results.append(RecipientResult(recipient, status, exc.dsn, exc.text, relay))
            continue
        where = "maildir" if mailbox.maildir else "mailbox"
        results.append(RecipientResult(recipient, "sent", "2.0.0", f"delivered to {where}",
                                       relay))
    return DeliveryOutcome(results)


def _delivered_to(message: bytes) -> set[str]:
    """The addresses of the Delivered-To headers already in the message (lower case)."""
    header = message.split(b"\n\n", 1)[0]
    return {line[13:].strip().decode("utf-8", "replace").lower()
            for line in header.split(b"\n") if line[:13].lower() == b"delivered-to:"}
