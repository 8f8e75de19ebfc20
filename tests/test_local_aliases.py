"""The local agent with alias_maps and .forward: files, Maildirs and commands written and run
with the right identity, forwarding through cleanup's inject with Delivered-To, loops, one
result per recipient; and end to end, swaks -> tern -> an alias to two Maildirs and a pipe."""

import asyncio
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_delivery_local import user  # noqa: F401 - the throwaway-user fixture

from engine.cleanup import RecipientRequest
from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery import aliases as aliases_module
from engine.delivery import local as local_agent

CONTENT = b"Subject: to the team\r\n\r\nhello team\r\n"
ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not ROOT, reason="needs root (useradd, setuid)")
# what commands and files of a root-owned alias file run as (default_privs), else ourselves
PRIVS = pwd.getpwnam("nobody") if ROOT else pwd.getpwuid(os.getuid())


@pytest.fixture(autouse=True)
def fresh_tables():
    aliases_module.alias_tables.cache_clear()
    yield
    aliases_module.alias_tables.cache_clear()


@pytest.fixture
def world():
    """A 0755 directory under /tmp, with ``out/`` writable by default_privs."""
    path = Path(tempfile.mkdtemp(prefix="tern-alias-"))
    path.chmod(0o755)
    (path / "out").mkdir()
    if ROOT:
        os.chown(path / "out", PRIVS.pw_uid, PRIVS.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def setup(world, text, **settings):
    aliases = world / "aliases"
    aliases.write_text(text)
    return Config(myhostname="mx.test", alias_maps=(f"texthash:{aliases}",), **settings)


def deliver(config, recipients, content=CONTENT, inject=None, sender="alice@example.org",
            **dsn):
    request = DeliveryRequest("4Qa1", sender, list(recipients), content,
                              NextHop("local", "mx.test", mx_lookup=False), smtputf8=False,
                              **dsn)
    return asyncio.run(local_agent.deliver(request, config, inject=inject)).results


class Inject:
    """Stands in for Cleanup.inject: keeps what would be queued."""

    def __init__(self):
        self.calls = []

    async def __call__(self, sender, recipients, content, **options):
        self.calls.append((sender, recipients, content, options))
        return SimpleNamespace(queue_id=f"4Fwd{len(self.calls)}")


def test_alias_to_an_mbox_file_a_maildir_and_a_command(world):
    out = world / "out"
    config = setup(world, f'team: {out}/team.mbox, {out}/md/, "|cat > {out}/piped"\n')
    (result,) = deliver(config, ["team@mx.test"])
    assert (result.status, result.dsn, result.relay) == ("sent", "2.0.0", "local")
    assert result.reply == (f"delivered to file: {out}/team.mbox; delivered to file: {out}/md/;"
                            f" delivered to command: cat > {out}/piped")
    mbox = (out / "team.mbox").read_bytes()
    assert mbox.startswith(b"From alice@example.org  ")
    assert (b"\nReturn-Path: <alice@example.org>\nX-Original-To: team@mx.test\n"
            b"Delivered-To: team@mx.test\nSubject: to the team\n\nhello team\n\n") in mbox
    (maildir,) = (out / "md" / "new").iterdir()
    assert maildir.read_bytes().endswith(b"Delivered-To: team@mx.test\nSubject: to the team\n"
                                         b"\nhello team\n")
    piped = (out / "piped").read_bytes()
    assert piped.startswith(b"From alice@example.org  ") and piped.endswith(b"\n\nhello team\n")
    for path in (out / "team.mbox", maildir, out / "piped"):  # default_privs, not root
        assert path.stat().st_uid == PRIVS.pw_uid


def test_command_environment_and_exit_statuses(world):
    out = world / "out"
    config = setup(world, f'env: "|env > {out}/env"\nlater: "|exit 75"\n'
                          f'nouser: "|echo no such user here; exit 67"\n'
                          f'odd: "|exit 3"\n', recipient_delimiter="+")
    results = deliver(config, ["env+ext@mx.test", "later@mx.test", "nouser@mx.test",
                               "odd@mx.test"])
    assert [(r.status, r.dsn) for r in results] == [
        ("sent", "2.0.0"), ("deferred", "4.3.0"), ("bounced", "5.1.1"), ("bounced", "5.3.0")]
    assert results[2].reply == ("|echo no such user here; exit 67 (expanded from "
                                "<nouser@mx.test>): user unknown: echo no such user here; "
                                "exit 67. Command output: no such user here")
    assert "Command died with status 3: exit 3" in results[3].reply
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines())
    assert (env["SENDER"], env["RECIPIENT"], env["LOCAL"], env["EXTENSION"], env["DOMAIN"],
            env["USER"], env["HOME"]) == ("alice@example.org", "env+ext@mx.test", "env", "ext",
                                          "mx.test", PRIVS.pw_name, PRIVS.pw_dir)


def test_command_time_limit_defers(world):
    config = setup(world, 'slow: "|sleep 30"\n', command_time_limit=0.2)
    (result,) = deliver(config, ["slow@mx.test"])
    assert (result.status, result.dsn) == ("deferred", "4.3.0")
    assert "Command time limit exceeded: sleep 30" in result.reply


def test_remote_addresses_are_forwarded_once_with_delivered_to(world):
    config = setup(world, "list: x@remote.test, Y@other.test, x@remote.test\n"
                          "owner-list: someone\nsolo: z@remote.test\n")
    inject = Inject()
    results = deliver(config, ["list@mx.test", "solo@mx.test"], inject=inject)
    assert [(r.status, r.reply) for r in results] == [("sent", "forwarded as 4Fwd1"),
                                                      ("sent", "forwarded as 4Fwd2")]
    (sender, recipients, content, options), second = inject.calls
    assert (sender, recipients, options) == (
        "owner-list@mx.test", [RecipientRequest("x@remote.test"), RecipientRequest("Y@other.test")],
        {"smtputf8": False, "ret": "", "envid": ""})
    assert content == b"Delivered-To: list@mx.test\r\n" + CONTENT
    assert second[:2] == ("alice@example.org", [RecipientRequest("z@remote.test")])
    # the copy comes back here (a remote alias pointing back): a loop, bounced
    (looped,) = deliver(config, ["list@mx.test"], content=content, inject=inject)
    assert (looped.status, looped.dsn, looped.reply) == (
        "bounced", "5.4.6", "mail forwarding loop for list@mx.test")
    assert len(inject.calls) == 2


def test_forwarded_copies_carry_the_dsn_request_without_success(world):
    """As local(8): NOTIFY goes on without SUCCESS (NEVER when that was all), ORCPT, RET and
    ENVID go on while the sender is kept, and not for a list with an owner- alias."""
    config = setup(world, "fw: x@remote.test\nonly: y@remote.test\n"
                          "list: z@remote.test\nowner-list: admin\n")
    inject = Inject()
    notify = {"fw@mx.test": "SUCCESS,FAILURE", "only@mx.test": "SUCCESS",
              "list@mx.test": "FAILURE,DELAY"}
    orcpt = {r: f"rfc822;{r}" for r in notify}
    deliver(config, list(notify), inject=inject, notify=notify, orcpt=orcpt, ret="HDRS",
            envid="Q+2B1")
    fw, only, listed = inject.calls
    assert (fw[1], fw[3]) == ([RecipientRequest("x@remote.test", "FAILURE", "rfc822;fw@mx.test")],
                              {"smtputf8": False, "ret": "HDRS", "envid": "Q+2B1"})
    assert only[1] == [RecipientRequest("y@remote.test", "NEVER", "rfc822;only@mx.test")]
    assert (listed[0], listed[1], listed[3]) == (
        "owner-list@mx.test", [RecipientRequest("z@remote.test", "FAILURE,DELAY", "")],
        {"smtputf8": False, "ret": "", "envid": ""})


def test_forwarding_without_cleanup_defers(world):
    (result,) = deliver(setup(world, "list: x@remote.test\n"), ["list@mx.test"])
    assert (result.status, result.dsn) == ("deferred", "4.3.0")


def test_a_failed_destination_bounces_the_recipient_after_the_others(world):
    out = world / "out"
    config = setup(world, f"mix: {out}/kept.mbox, ghost, a@remote.test\nfail: ghost2\n")
    inject = Inject()
    mixed, alone = deliver(config, ["mix@mx.test", "fail@mx.test"], inject=inject)
    assert (mixed.status, mixed.dsn, mixed.reply) == (
        "bounced", "5.1.1", 'ghost@mx.test (expanded from <mix@mx.test>): unknown user: "ghost"')
    assert (out / "kept.mbox").exists() and len(inject.calls) == 1  # the others went
    assert (alone.status, alone.dsn) == ("bounced", "5.1.1")


def test_a_temporary_expansion_failure_defers_the_recipient_delivering_nothing(
        world, monkeypatch):
    """A file read that times out (a user stopping their reader) defers the recipient: the
    other destinations are not delivered now (each retry would deliver them again), and the
    expansion stops there (no more reads)."""
    out = world / "out"
    slow, later = world / "slow", world / "later"
    slow.write_text("x@remote.test\n")
    later.write_text("y@remote.test\n")
    reads = []
    real = aliases_module.read_as

    def read_as(path, *args, **kwargs):
        reads.append(path)
        if path == str(slow):
            raise TimeoutError(110, "timed out", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(aliases_module, "read_as", read_as)
    config = setup(world, f"staff: {out}/copy.mbox, :include:{slow}, :include:{later}\n")
    inject = Inject()
    for _ in range(2):  # each retry the same: nothing delivered, deferred
        (result,) = deliver(config, ["staff@mx.test"], inject=inject)
        assert (result.status, result.dsn, result.reply) == (
            "deferred", "4.3.0",
            f"{slow} (expanded from <staff@mx.test>): include file {slow}: read timed out")
    assert not (out / "copy.mbox").exists() and not inject.calls
    assert reads == [str(slow)] * 2


def test_an_unreadable_alias_file_defers(world):
    config = setup(world, "ok: x@remote.test\n")
    (world / "aliases").write_text("broken line\n")
    (result,) = deliver(config, ["anyone@mx.test"])
    assert (result.status, result.dsn, result.reply) == (
        "deferred", "4.3.0", "alias database unavailable")


@root_only
def test_forward_file_runs_as_its_user(world, user):  # noqa: F811 - the fixture
    name, uid, gid, home = user
    forward = home / ".forward"
    forward.write_text(f'\\{name}, "|id -u > {home}/who"\n')
    os.chown(forward, uid, gid)
    config = setup(world, "", home_mailbox="Maildir/")
    (result,) = deliver(config, [f"{name}@mx.test"])
    assert (result.status, result.reply) == (
        "sent", f"delivered to maildir; delivered to command: id -u > {home}/who")
    assert (home / "who").read_text().strip() == str(uid)
    assert (home / "who").stat().st_uid == uid
    (box,) = (home / "Maildir" / "new").iterdir()
    assert box.stat().st_uid == uid


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_to_an_alias_of_two_maildirs_and_a_pipe(tern, world):
    """End to end: smtpd accepts the alias (local_recipient_maps includes alias_maps), qmgr
    routes it to local, which writes two Maildirs and runs the pipe, as default_privs."""
    out = world / "out"
    aliases = world / "aliases"
    aliases.write_text(f"# team list\nteam: {out}/one/,\n\t{out}/two/,\n"
                       f'\t"|cat > {out}/piped"\n')
    server = tern(alias_maps=[f"texthash:{aliases}"])
    swaks = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "client.test",
         "--from", "alice@example.org", "--to", "team@mx.tern.test",
         "--header", "Subject: alias end to end", "--body", "hello aliases"],
        capture_output=True, text=True, timeout=30)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    log = server.wait_log("status=sent (delivered to file")
    assert "tern/local" in log and "to=<team@mx.tern.test>, relay=local, " in log
    assert f"delivered to command: cat > {out}/piped)" in log
    for box in ("one", "two"):
        (path,) = (out / box / "new").iterdir()
        content = path.read_bytes()
        assert b"Delivered-To: team@mx.tern.test\n" in content
        assert b"Subject: alias end to end\n" in content and b"hello aliases" in content
        assert path.stat().st_uid == PRIVS.pw_uid
    piped = (out / "piped").read_bytes()
    assert b"Subject: alias end to end\n" in piped and b"hello aliases" in piped
    unknown = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "client.test",
         "--from", "alice@example.org", "--to", "nosuchalias7@mx.tern.test"],
        capture_output=True, text=True, timeout=30)
    assert "550 5.1.1 <nosuchalias7@mx.tern.test>: Recipient address rejected" in unknown.stdout


def test_alias_to_a_remote_address_is_forwarded_through_cleanup(tern, smtp_sink, world):
    """The forwarded copy is a new queued message (from the original sender, marked
    Delivered-To: the alias) that goes out like any mail: here to smtp-sink."""
    sink = smtp_sink()
    aliases = world / "aliases"
    aliases.write_text("fw: someone@remote.test\n")
    server = tern(alias_maps=[f"texthash:{aliases}"],
                  transport_maps={"remote.test": f"smtp:{sink.nexthop}"})
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail("alice@example.org", ["fw@mx.tern.test"], CONTENT)
    log = server.wait_log("to=<someone@remote.test>")
    forwarded = re.search(r"to=<fw@mx\.tern\.test>, relay=local, .*status=sent "
                          r"\(forwarded as (\w+)\)", log)
    assert forwarded, log
    assert f"{forwarded.group(1)}: from=<alice@example.org>" in log
    (message,) = sink.wait_messages(1)
    assert (message.sender, message.recipients) == ("alice@example.org", ("someone@remote.test",))
    assert b"\r\nDelivered-To: fw@mx.tern.test\r\n" in message.content
    assert message.content.endswith(b"\r\n\r\nhello team\r\n")


@root_only
def test_file_destination_needs_no_ownership(world):
    """strict_mailbox_ownership is for mailboxes: local(8) appends to an alias's file that
    someone else owns, when its rights may write it (here a root-owned 0666 file)."""
    out = world / "out"
    shared = out / "shared.log"
    shared.write_bytes(b"")
    shared.chmod(0o666)
    config = setup(world, f"log: {shared}\n")
    (result,) = deliver(config, ["log@mx.test"])
    assert (result.status, result.reply) == ("sent", f"delivered to file: {shared}")
    assert shared.stat().st_uid == 0 and b"\n\nhello team\n" in shared.read_bytes()


def test_dev_null_alias_discards_without_a_dotlock(world):
    """The classic ``devnull: /dev/null`` alias: local(8) lets a file destination's dotlock
    fail (MBOX_DOT_LOCK_MAY_FAIL), so the write goes to the device under the fcntl lock alone
    and the recipient is sent, not deferred for want of /dev/null.lock."""
    config = setup(world, "devnull: /dev/null\n")
    (result,) = deliver(config, ["devnull@mx.test"])
    assert (result.status, result.reply) == ("sent", "delivered to file: /dev/null")
    assert not os.path.exists("/dev/null.lock")


def test_expansion_runs_off_the_event_loop(world, monkeypatch):
    """Alias expansion reads files (through forked children): never in the loop's thread."""
    threads = []
    real = aliases_module.Expander.expand
    monkeypatch.setattr(aliases_module.Expander, "expand",
                        lambda self, r: threads.append(threading.get_ident()) or real(self, r))
    config = setup(world, f"box: {world}/out/box\n")
    (result,) = deliver(config, ["box@mx.test"])
    assert result.status == "sent"
    assert threads and threading.get_ident() not in threads


def test_an_ignored_forward_file_is_a_warning_of_the_outcome(world, user):  # noqa: F811
    """local(8) warns of a .forward it ignores; qmgr logs the outcome's warnings."""
    name, uid, gid, home = user
    forward = home / ".forward"
    forward.write_text("someone@elsewhere.test\n")
    os.chown(forward, uid, gid)
    forward.chmod(0o666)
    config = setup(world, "", home_mailbox="Maildir/")
    request = DeliveryRequest("4Qa1", "a@example.org", [f"{name}@mx.test"], CONTENT,
                              NextHop("local", "mx.test", mx_lookup=False), smtputf8=False)
    outcome = asyncio.run(local_agent.deliver(request, config))
    assert [r.reply for r in outcome.results] == ["delivered to maildir"]
    assert outcome.warnings == [f"file {forward} is world writable"]


@root_only
def test_roots_forward_runs_commands_and_files_as_default_privs(world):
    """uid 0 (root's .forward, a root-owned alias) becomes default_privs' uid and gid 0 its
    gid when a command runs or a file is written (local(8)'s command.c, file.c)."""
    rootfwd = world / "rootfwd"
    rootfwd.write_text(f'"|id -u > {world}/out/who; id -g >> {world}/out/who", '
                       f'{world}/out/file\n')
    config = setup(world, "", forward_path=(str(rootfwd),),
                   allow_mail_to_files=("alias", "forward"))
    (result,) = deliver(config, ["root@mx.test"])
    assert result.status == "sent", result.reply
    assert (world / "out" / "who").read_text().split() == [str(PRIVS.pw_uid),
                                                           str(PRIVS.pw_gid)]
    info = (world / "out" / "file").stat()
    assert (info.st_uid, info.st_gid) == (PRIVS.pw_uid, PRIVS.pw_gid)


def test_command_environment_values_are_censored(world):
    """command.c: characters outside command_expansion_filter become "_" in every exported
    value (a sender like ``"$(reboot)"@x`` reaches a script as plain text)."""
    out = world / "out"
    config = setup(world, f'env: "|env > {out}/env"\n')
    (result,) = deliver(config, ["env@mx.test"], sender='"a$(id);b`x`"@example.org')
    assert result.status == "sent", result.reply
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines())
    assert env["SENDER"] == "_a__id__b_x__@example.org"


def test_an_executable_file_destination_bounces(world):
    """local(8)'s deliver_file never appends mail to an executable file."""
    program = world / "out" / "program"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    if ROOT:
        os.chown(program, PRIVS.pw_uid, PRIVS.pw_gid)
    config = setup(world, f"prog: {program}\n")
    (result,) = deliver(config, ["prog@mx.test"])
    assert (result.status, result.dsn) == ("bounced", "5.7.1")
    assert result.reply.endswith(f"destination file {program} is executable")
    assert program.read_text() == "#!/bin/sh\n"
