"""The pipe(8) delivery agent: hand the message to a command, as Postfix's pipe does.

A ``[pipe_transports.NAME]`` table gives the argv template, the user and the time limit. The
message goes to the command's standard input (LF line ends); its exit status decides, as
sysexits(3) say: 0 sent, 71 (EX_OSERR) and 75 (EX_TEMPFAIL) deferred, anything else bounced,
unless its output starts with an enhanced status code ("4.2.2 mailbox full"), which then
decides; killed by a signal or by the time limit: deferred. What the command printed goes into
the reason (the log and the bounce). One command runs for all the request's recipients: an
argument that holds a recipient macro is repeated once per recipient, as Postfix expands
``${recipient}``.

The command runs as the configured user when Tern is root (set in the child before exec, also
under uvloop: Tern's own identity never changes), else as Tern's own user.
"""

import asyncio
import contextlib
import dataclasses
import functools
import os
import pwd
import re
import time

from engine.config import Config
from engine.config.settings import PipeTransport
from engine.delivery import (
    MACRO,
    DeliveryOutcome,
    DeliveryRequest,
    RecipientResult,
    TransientFailure,
    split_local,
)
from engine.delivery.mailbox import mbox_quote

OUTPUT_LIMIT = 2048  # bytes of command output kept for the reason text
RECIPIENT_MACROS = frozenset({"recipient", "original_recipient", "user", "extension", "mailbox",
                              "domain"})
MESSAGE_MACROS = frozenset({"sender", "nexthop", "size", "queue_id"})
MACROS = RECIPIENT_MACROS | MESSAGE_MACROS

# Command output that starts with an enhanced status code ("5.1.1 no such user"): after a
# non-zero exit, that status and the text after it are the result (Postfix's pipe(8)). Only
# the 4 and 5 classes: a failed command reports no success.
OUTPUT_DSN = re.compile(r"([45]\.\d{1,3}\.\d{1,3})(?:\s|$)")

# sysexits(3) as Postfix's sys_exits table words them: status -> (dsn, text); a 4.x.x status
# (EX_OSERR, EX_TEMPFAIL) defers, the others bounce
SYSEXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}


# Postfix's pipe flags that Tern has: B (blank line at the end), D (Delivered-To), F (From
# line), O (X-Original-To), R (Return-Path), h (lower-case domains), u (lower-case local
# parts), "." (dot-stuff lines), ">" (quote "From " lines).
FLAGS = "BDFORhu.>"


def unknown_macros(argv: tuple[str, ...]) -> set[str]:
    """Macro names in ``argv`` that pipe does not know (the configuration refuses them)."""
    return {a or b for arg in argv for a, b in MACRO.findall(arg)} - MACROS


def _fold(address: str, flags: str) -> str:
    """``u`` lower-cases the local part, ``h`` the domain."""
    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    return ((local.lower() if "u" in flags else local) + at
            + (domain.lower() if "h" in flags else domain))


def expand_argv(argv: tuple[str, ...], request: DeliveryRequest, delimiter: str,
                flags: str = "") -> list[str]:
    """The command line for ``request``: message macros filled in, and each argument with a
    recipient macro repeated for every recipient."""
    nexthop = request.nexthop.host.lower() if "h" in flags else request.nexthop.host
    # the null sender is MAILER-DAEMON (Postfix pipe(8)'s null_sender default)
    common = {"sender": request.sender or "MAILER-DAEMON", "nexthop": nexthop,
              "size": str(len(request.content)), "queue_id": request.queue_id}
    per_recipient = []
    for recipient in request.recipients:
        recipient = _fold(recipient, flags)
        user, extension, domain = split_local(recipient, delimiter)
        mailbox = recipient.rpartition("@")[0] if "@" in recipient else recipient
        per_recipient.append({"recipient": recipient, "original_recipient": recipient,
                              "user": user, "extension": extension, "mailbox": mailbox,
                              "domain": domain})
    out: list[str] = []
    for arg in argv:
        names = {a or b for a, b in MACRO.findall(arg)}
        values = per_recipient if names & RECIPIENT_MACROS else [{}]
        for extra in values:
            table = {**common, **extra}
            out.append(MACRO.sub(lambda m, t=table: t.get(m.group(1) or m.group(2), ""), arg))
    return out


def output_text(output: bytes) -> str:
    text = output[:OUTPUT_LIMIT].decode("utf-8", "replace")
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _verdict(name: str, argv0: str, returncode: int, output: bytes) -> tuple[str, str, str]:
    """(status, dsn, reason) for the command's end."""
    said = output_text(output)
    tail = f". Command output: {said}" if said else ""
    if returncode == 0:
        return "sent", "2.0.0", f"delivered via {name} service{f' ({said})' if said else ''}"
    if returncode < 0:
        return "deferred", "4.3.0", f'Command died with signal {-returncode}: "{argv0}"{tail}'
    died = f'Command died with status {returncode}: "{argv0}"'
    if (status := OUTPUT_DSN.match(said)) is not None:  # "D.S.N text" output decides
        dsn, text = status.group(1), said[status.end():].strip() or died
        return ("deferred" if dsn[0] == "4" else "bounced"), dsn, text
    if returncode in SYSEXITS:
        dsn, text = SYSEXITS[returncode]
        return ("deferred" if dsn[0] == "4" else "bounced"), dsn, text + tail
    return "bounced", "5.3.0", died + tail


def message_data(request: DeliveryRequest, flags: str) -> bytes:
    """What the command reads: the message with LF line ends, and what the flags add."""
    body = request.content.replace(b"\r\n", b"\n")
    if ">" in flags:
        body = mbox_quote(body)
    if "." in flags:
        body = (b"." + body if body.startswith(b".") else body).replace(b"\n.", b"\n..")
    head = ""
    if "F" in flags:
        head += f"From {request.sender or 'MAILER-DAEMON'}  {time.asctime()}\n"
    if "R" in flags:
        head += f"Return-Path: <{request.sender}>\n"
    if "O" in flags:
        head += f"X-Original-To: {request.recipients[0]}\n"
    if "D" in flags:
        head += f"Delivered-To: {request.recipients[0]}\n"
    if "B" in flags and not body.endswith(b"\n\n"):
        body += b"\n" if body.endswith(b"\n") else b"\n\n"
    return head.encode() + body


def refused_addresses(request: DeliveryRequest, name: str) -> list[RecipientResult]:
    """Postfix's allow_min_user = no, where it cannot be bypassed (smtpd refuses these too,
    but the sendmail command, the API or an old queue may carry them): an address starting
    with "-" never reaches a command line, where it would read as an option. A sender so
    bounces every recipient; such a recipient bounces alone."""
    if request.sender[:1] == "-":
        return [RecipientResult(r, "bounced", "5.1.7", "bad sender address syntax", name)
                for r in request.recipients]
    return [RecipientResult(r, "bounced", "5.1.3", "bad address syntax", name)
            for r in request.recipients if r[:1] == "-"]


async def deliver(request: DeliveryRequest, config: Config, name: str,
                  transport: PipeTransport) -> DeliveryOutcome:
    """Run the command; with the D or O flag (a per-recipient header) once per recipient, as
    Postfix needs destination_recipient_limit = 1 for them."""
    if refused := refused_addresses(request, name):
        left = [r for r in request.recipients if r[:1] != "-"]
        if request.sender[:1] == "-" or not left:
            return DeliveryOutcome(refused)
        outcome = await deliver(dataclasses.replace(request, recipients=left), config, name,
                                transport)
        results, bad = iter(outcome.results), iter(refused)  # back in the request's order
        outcome.results = [next(bad) if r[:1] == "-" else next(results)
                           for r in request.recipients]
        return outcome
    if len(request.recipients) > 1 and set("DO") & set(transport.flags):
        results = []
        for recipient in request.recipients:
            one = dataclasses.replace(request, recipients=[recipient])
            try:
                results += (await _run(one, config, name, transport)).results
            except TransientFailure as failure:
                results.append(RecipientResult(recipient, "deferred", failure.dsn, failure.text,
                                               name))
        return DeliveryOutcome(results)
    return await _run(request, config, name, transport)


async def _run(request: DeliveryRequest, config: Config, name: str,
               transport: PipeTransport) -> DeliveryOutcome:
    argv = expand_argv(transport.argv, request, config.recipient_delimiter, transport.flags)
    identity: dict = {}
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(transport.user)
        except KeyError:
            raise TransientFailure("4.3.5", f"{name}: unknown user {transport.user}",
                                   name) from None
        if entry.pw_uid == 0:
            raise TransientFailure("4.3.5", f"{name}: user {transport.user} has root privileges",
                                   name)
        identity = {"user": entry.pw_uid, "group": entry.pw_gid, "cwd": "/"}
    try:
        returncode, output = await run_command(
            argv, message_data(request, transport.flags),
            {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "LANG": "C"}, identity,
            transport.time_limit)
    except OSError as exc:
        raise TransientFailure("4.3.0", f'{name}: cannot run "{argv[0]}": {exc.strerror}',
                               name) from None
    if returncode is None:
        raise TransientFailure("4.3.0", f'Command time limit exceeded: "{argv[0]}"', name)
    status, dsn, reason = _verdict(name, argv[0], returncode, output)
    return DeliveryOutcome([RecipientResult(r, status, dsn, reason, name)
                            for r in request.recipients])


async def run_command(argv: list[str], data: bytes, env: dict[str, str], identity: dict,
                      time_limit: float) -> tuple[int | None, bytes]:
    """Run ``argv`` in its own session with ``data`` on its standard input; ``identity``:
    user and group ids, and cwd ({} = Tern's own identity). Returns (exit status, negative for
    a signal, or None when ``time_limit`` killed it and all it started; the first
    OUTPUT_LIMIT bytes of its output). Raises
    OSError when it cannot start. Shared by pipe(8) and local(8)'s |command.
    The identity is taken in the child before exec (no supplementary groups), by a
    preexec_fn of plain system calls: uvloop's subprocess has no user/group arguments. The
    cwd is entered with that identity, after it is taken (subprocess's cwd= would enter it
    as root), or "/" when it cannot be, as Postfix's command.c."""
    options: dict = {}
    if "user" in identity:
        options["preexec_fn"] = functools.partial(_become, identity["user"], identity["group"],
                                                  identity.get("cwd", "/"))
    elif "cwd" in identity:
        options["cwd"] = identity["cwd"] if os.path.isdir(identity["cwd"]) else "/"
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=env, **options)
    feeder = asyncio.ensure_future(_feed(process, data))
    finished = False
    try:
        async with asyncio.timeout(time_limit):
            output = await _kept_output(process)
            await feeder
            await process.wait()
            finished = True
    except TimeoutError:
        return None, b""
    finally:
        feeder.cancel()
        if not finished:
            # timed out, cancelled (the queue manager stopping) or failed: the command and
            # what it started must not outlive the delivery, even when the shell itself has
            # exited and left a child holding its output: the group killed, the shell
            # reaped, the pipes closed (none left to a closed loop)
            _kill_group(process)
            await asyncio.shield(process.wait())
            transport = getattr(process, "_transport", None)
            if transport is not None:
                transport.close()
    return process.returncode, output


async def _feed(process: asyncio.subprocess.Process, data: bytes) -> None:
    """The message to the command's input; a command that does not read it all is no
    error (its exit status decides)."""
    try:
        process.stdin.write(data)
        await process.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            process.stdin.close()


async def _kept_output(process: asyncio.subprocess.Process) -> bytes:
    """The command's output until it closes it: the first OUTPUT_LIMIT bytes kept (they go
    into the reason text), the rest read and dropped, so memory stays bounded whatever it
    writes."""
    kept = bytearray()
    while chunk := await process.stdout.read(65536):
        if len(kept) < OUTPUT_LIMIT:
            kept += chunk[:OUTPUT_LIMIT - len(kept)]
    return bytes(kept)


def _become(uid: int, gid: int, cwd: str = "/") -> None:
    """In the child, before exec: drop to ``uid``/``gid`` with no supplementary groups, then
    enter ``cwd`` with those rights ("/" when they cannot reach it)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """The command and whatever it started (its own session): SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)
