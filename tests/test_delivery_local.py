"""The local and virtual delivery agents: Maildir and mbox files, locks, modes and owners.

Runs as root where it can (CI does): a throwaway user made with useradd receives the mail, and
the files must be written with that user's identity by a child, never by Tern changing its own.
"""

import asyncio
import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery import local as local_agent
from engine.delivery.mailbox import MailboxError, deliver_mbox, mbox_entry, mbox_quote
from engine.delivery.route import nexthop_for

CONTENT = b"Subject: hello\r\n\r\nFrom the start of a line\r\n>From quoted already\r\nbye\r\n"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd, setuid)")


def run(coro):
    return asyncio.run(coro)


def request(recipients, transport="local", sender="alice@example.org"):
    return DeliveryRequest("4Q1d", sender, list(recipients), CONTENT,
                           NextHop(transport, "example.test", mx_lookup=False))


@pytest.fixture
def world():
    """A 0755 directory under /tmp (pytest's base temp is 0700: another uid cannot reach it)."""
    path = Path(tempfile.mkdtemp(prefix="tern-local-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user(world):
    """A throwaway system user with its home under ``world``."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.getuid())
        home = world / "home"
        home.mkdir()
        return entry.pw_name, entry.pw_uid, entry.pw_gid, home
    name = "tt" + uuid.uuid4().hex[:10]
    home = world / name
    subprocess.run(["useradd", "--no-user-group", "--gid", "nogroup", "--home-dir", str(home),
                    "--create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    entry = pwd.getpwnam(name)
    yield name, entry.pw_uid, entry.pw_gid, home
    subprocess.run(["userdel", name], check=False)


def test_maildir_delivery_as_the_user(user):
    name, uid, gid, home = user
    config = Config(myhostname="mx.example.test", home_mailbox="Maildir/")
    outcome = run(local_agent.deliver(request([f"{name}@example.test"] * 2), config))
    assert [(r.status, r.dsn, r.reply, r.relay) for r in outcome.results] == [
        ("sent", "2.0.0", "delivered to maildir", "local")] * 2
    maildir = home / "Maildir"
    files = sorted((maildir / "new").iterdir())
    assert len(files) == 2 and files[0].name != files[1].name  # unique names
    assert list((maildir / "tmp").iterdir()) == []
    for directory in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        info = directory.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert (info.st_uid, info.st_gid) == (uid, gid)
    for path in files:
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert (info.st_uid, info.st_gid) == (uid, gid)
        assert path.read_bytes() == (
            f"Return-Path: <alice@example.org>\nDelivered-To: {name}@example.test\n".encode()
            + CONTENT.replace(b"\r\n", b"\n"))
    assert os.geteuid() == pwd.getpwnam(pwd.getpwuid(os.geteuid()).pw_name).pw_uid


def test_mbox_delivery_with_from_lines_and_quoting(user, world):
    name, uid, gid, _ = user
    spool = world / "mail"
    spool.mkdir(mode=0o1777)
    spool.chmod(0o1777)  # as /var/mail on systems without a setgid delivery agent
    config = Config(myhostname="mx.example.test", mail_spool_directory=str(spool))
    first = run(local_agent.deliver(request([f"{name}@example.test"]), config))
    second = run(local_agent.deliver(request([f"{name.upper()}@example.test"], sender=""),
                                     config))
    assert [r.reply for r in first.results + second.results] == ["delivered to mailbox"] * 2
    mbox = spool / name
    info = mbox.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and (info.st_uid, info.st_gid) == (uid, gid)
    assert not (spool / f"{name}.lock").exists()
    text = mbox.read_bytes()
    entries = text.split(b"\n\nFrom ")
    assert len(entries) == 2
    assert text.startswith(b"From alice@example.org  ")
    assert entries[1].startswith(b"MAILER-DAEMON  ")
    body = (b"Subject: hello\n\n>From the start of a line\n>From quoted already\nbye\n")
    assert (entries[0] + b"\n").endswith(
        b"Delivered-To: " + f"{name}@example.test\n".encode() + body)
    assert text.endswith(b"Return-Path: <>\nDelivered-To: "
                         + f"{name.upper()}@example.test\n".encode() + body + b"\n")


def test_mbox_quoting():
    assert mbox_quote(b"From x\nFrom y\n From z\nFromage\n") == (
        b">From x\n>From y\n From z\nFromage\n")
    entry = mbox_entry("s@x", b"a\nb", now=0)
    assert entry.startswith(b"From s@x  ") and entry.endswith(b"\na\nb\n\n")


@root_only
def test_the_write_happens_with_the_users_identity(user, world):
    """A home mailbox in a directory the user may not write (root-owned, 0755) is refused to
    the child, proving it does not write as root; the server keeps its own identity."""
    name, _, _, home = user
    (home / "rootonly").mkdir(mode=0o755)
    config = Config(home_mailbox="rootonly/mbox", deliver_lock_attempts=1)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("deferred", "4.2.0")
    assert "Permission denied" in result.reply
    assert list((home / "rootonly").iterdir()) == []
    assert os.geteuid() == 0 and os.getegid() == 0


def _delivered_by_spool_rule(user, spool):
    name, uid, gid, _ = user
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)
    outcome = run(local_agent.deliver(request([f"{name}@example.test"] * 2), config))
    assert [(r.status, r.reply) for r in outcome.results] == [("sent", "delivered to mailbox")] * 2
    assert sorted(os.listdir(spool)) == [name]  # no dotlock left
    assert (spool / name).read_bytes().count(b"\nSubject: hello\n") == 2
    assert os.geteuid() == 0 and os.getegid() == 0
    return (spool / name).stat()


@root_only
def test_mbox_in_a_group_writable_mail_spool(user, world):
    """Debian's /var/mail (2775 root:mail): as Postfix's local(8), the dotlock and the file
    are made with the recipient's uid and the spool's group (the user's own gid cannot write
    there), the message appended as the recipient."""
    import grp
    _, uid, _, _ = user
    spool = world / "mail"
    spool.mkdir()
    mail_gid = grp.getgrnam("mail").gr_gid
    os.chown(spool, 0, mail_gid)
    spool.chmod(0o2775)
    info = _delivered_by_spool_rule(user, spool)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, mail_gid, 0o600)


@root_only
def test_mbox_in_a_root_only_mail_spool(user, world):
    """A spool only root may write (0755): locked and created as root, the new file given to
    the recipient (Postfix's chown), then written as the recipient."""
    _, uid, gid, _ = user
    spool = world / "mail"
    spool.mkdir(mode=0o755)
    info = _delivered_by_spool_rule(user, spool)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, 0o600)


def test_unknown_local_user_bounces(world):
    config = Config(mail_spool_directory=str(world))
    (result,) = run(local_agent.deliver(request(["no-such-user-x1@example.test"]),
                                        config)).results
    assert (result.status, result.dsn, result.reply) == (
        "bounced", "5.1.1", 'unknown user: "no-such-user-x1"')


def test_recipient_delimiter_strips_the_extension(user, world):
    name, *_ = user
    config = Config(home_mailbox="Maildir/", recipient_delimiter="+")
    (result,) = run(local_agent.deliver(request([f"{name}+lists@example.test"]),
                                        config)).results
    assert result.status == "sent"
    (path,) = (user[3] / "Maildir" / "new").iterdir()
    assert f"Delivered-To: {name}+lists@example.test\n".encode() in path.read_bytes()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_fcntl_lock(path, seconds):
    """Another process holding the mbox's fcntl lock for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    return holder


def test_mbox_locked_by_another_writer_defers(world):
    mbox = world / "box"
    holder = _hold_fcntl_lock(mbox, 30)
    try:
        with pytest.raises(MailboxError) as caught:
            deliver_mbox(str(mbox), b"From x  now\nhello\n\n", attempts=3, delay=0.01)
        assert caught.value.transient and caught.value.dsn == "4.2.0"
        assert "unable to lock for exclusive access" in caught.value.text
        assert mbox.read_bytes() == b""
        assert not (world / "box.lock").exists()  # the dotlock is released again
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_mbox_waits_for_a_lock_released_in_time(world):
    mbox = world / "box"
    holder = _hold_fcntl_lock(mbox, 0.3)
    try:
        started = time.monotonic()
        deliver_mbox(str(mbox), b"From x  now\nhello\n\n", attempts=200, delay=0.05)
        assert time.monotonic() - started >= 0.05  # it waited at least one delay
        assert mbox.read_bytes() == b"From x  now\nhello\n\n"
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_mbox_dotlock_held_defers_through_the_agent(user, world):
    name, *_ = user
    spool = world / "mail"
    spool.mkdir()
    spool.chmod(0o1777)
    lock = spool / f"{name}.lock"
    lock.write_bytes(b"")  # another writer's dotlock (fresh: not stale)
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=2,
                    deliver_lock_delay=0.01)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("deferred", "4.2.0")
    assert "unable to lock for exclusive access" in result.reply
    assert lock.exists() and not (spool / name).exists()


def test_fcntl_lock_is_taken_while_writing(world, monkeypatch):
    """The file is fcntl-locked during the write (another process cannot lock it then)."""
    mbox = world / "box"
    seen = []

    def probe(fd, data):
        probe_fd = os.open(mbox, os.O_WRONLY)
        script = ("import fcntl,os,sys\nfd=os.open(sys.argv[1],os.O_WRONLY)\n"
                  "try:\n fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB)\nexcept OSError:\n"
                  " sys.exit(3)\n")
        seen.append(subprocess.run([sys.executable, "-c", script, str(mbox)]).returncode)
        seen.append((world / "box.lock").exists())
        os.close(probe_fd)
        os.write(fd, data)

    from engine.delivery import mailbox
    monkeypatch.setattr(mailbox, "_write_all", probe)
    deliver_mbox(str(mbox), b"From x  now\nhi\n\n", attempts=1, delay=0.01)
    assert seen == [3, True]
    assert mbox.read_bytes() == b"From x  now\nhi\n\n"
    fd = os.open(mbox, os.O_WRONLY)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    os.close(fd)


def test_virtual_mailboxes(world):
    base = world / "vmail"
    base.mkdir()
    owner = 65534 if os.geteuid() == 0 else os.getuid()  # nobody
    if os.geteuid() == 0:
        os.chown(base, owner, owner)
    maps = world / "vmailbox"
    maps.write_text("ann@virtual.test  virtual.test/ann/\n"
                    "bob@virtual.test  virtual.test/bob.mbox\n"
                    "evil@virtual.test ../../etc/x/\n")
    config = Config(virtual_mailbox_domains=("virtual.test",), virtual_mailbox_base=str(base),
                    virtual_mailbox_maps=f"texthash:{maps}",
                    virtual_uid_maps=f"static:{owner}", virtual_gid_maps=f"static:{owner}",
                    virtual_minimum_uid=0)
    assert nexthop_for("virtual.test", config) == NextHop("virtual", "virtual.test",
                                                          mx_lookup=False)
    (base / "virtual.test").mkdir()
    if os.geteuid() == 0:
        os.chown(base / "virtual.test", owner, owner)
    outcome = run(local_agent.deliver(request(
        ["ann@virtual.test", "Bob@Virtual.test", "carl@virtual.test", "evil@virtual.test"],
        transport="virtual"), config, virtual=True))
    assert [(r.status, r.dsn, r.reply, r.relay) for r in outcome.results] == [
        ("sent", "2.0.0", "delivered to maildir", "virtual"),
        ("sent", "2.0.0", "delivered to mailbox", "virtual"),
        ("bounced", "5.1.1", 'unknown user: "carl@virtual.test"', "virtual"),
        ("deferred", "4.3.5", "virtual_mailbox_maps: '../../etc/x/' leaves "
                              "virtual_mailbox_base", "virtual"),
    ]
    (ann,) = (base / "virtual.test" / "ann" / "new").iterdir()
    bob = base / "virtual.test" / "bob.mbox"
    for path in (ann, bob):
        assert path.stat().st_uid == owner and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"Delivered-To: Bob@Virtual.test\n" in bob.read_bytes()
    below = Config(**{**config.__dict__, "virtual_minimum_uid": owner + 1})
    (result,) = run(local_agent.deliver(request(["ann@virtual.test"], "virtual"), below,
                                        virtual=True)).results
    assert result.status == "deferred" and "virtual_minimum_uid" in result.reply


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_to_tern_to_maildir(tern, user):
    """End to end: smtpd accepts the passwd user, qmgr routes the local domain to the local
    agent, the Maildir file appears owned by the user, and the log says so."""
    name, uid, _, home = user
    server = tern(home_mailbox="Maildir/", recipient_delimiter="+")
    swaks = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "client.test",
         "--from", "alice@example.org", "--to", f"{name}+box@mx.tern.test",
         "--header", "Subject: end to end", "--body", "hello Maildir"],
        capture_output=True, text=True, timeout=30)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    refused = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "client.test",
         "--from", "alice@example.org", "--to", "nosuchuser9@mx.tern.test"],
        capture_output=True, text=True, timeout=30)
    assert "550 5.1.1 <nosuchuser9@mx.tern.test>: Recipient address rejected: User unknown " \
           "in local recipient table" in refused.stdout
    log = server.wait_log("status=sent (delivered to maildir)")
    assert "tern/local" in log and f"to=<{name}+box@mx.tern.test>, relay=local, " in log
    (path,) = (home / "Maildir" / "new").iterdir()
    assert path.stat().st_uid == uid
    content = path.read_bytes()
    assert content.startswith(f"Return-Path: <alice@example.org>\nDelivered-To: "
                              f"{name}+box@mx.tern.test\nReceived: ".encode())
    assert b"Subject: end to end\n" in content and b"\n\nhello Maildir\n" in content


def test_a_message_already_delivered_to_the_recipient_is_a_loop(user):
    name, *_ = user
    config = Config(home_mailbox="Maildir/")
    looped = DeliveryRequest("4Q", "s@x.test", [f"{name}@example.test"],
                             f"DELIVERED-TO: {name.upper()}@example.test\r\n"
                             f"Subject: x\r\n\r\nDelivered-To: other\r\n".encode(),
                             NextHop("local", "example.test", mx_lookup=False))
    (result,) = run(local_agent.deliver(looped, config)).results
    assert (result.status, result.dsn, result.reply) == (
        "bounced", "5.4.6", f"mail forwarding loop for {name}@example.test")
    assert not (user[3] / "Maildir").exists()


def _spool_1777(world):
    spool = world / "mail"
    spool.mkdir()
    spool.chmod(0o1777)  # any local user may create files here (sticky)
    return spool


@root_only
def test_mbox_created_first_by_another_user_defers_untouched(user, world):
    """Another local user ("nobody") made the recipient's mailbox first, world-writable, to
    read the mail: as Postfix's strict_mailbox_ownership, nothing is appended; it defers."""
    name, *_ = user
    spool = _spool_1777(world)
    mbox = spool / name
    mbox.write_bytes(b"")
    mbox.chmod(0o666)
    os.chown(mbox, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("deferred", "4.2.0")
    assert result.reply == f"destination {mbox} is not owned by recipient"  # no "expanded from"
    assert mbox.read_bytes() == b""
    assert not (spool / f"{name}.lock").exists()


@root_only
def test_mbox_that_is_a_fifo_is_refused_without_blocking(user, world):
    """A FIFO at the mailbox path: opened without blocking (with or without a reader) and
    refused as not a regular file (Postfix's 5.2.0), instead of hanging the delivery."""
    name, uid, gid, _ = user
    spool = _spool_1777(world)
    fifo = spool / name
    os.mkfifo(fifo)
    os.chown(fifo, uid, gid)  # the kernel's protected_fifos refuses other owners' FIFOs here
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)
    (alone,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        (read,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
        assert os.read(reader, 100) == b""  # nothing was written into it
    finally:
        os.close(reader)
    for result in (alone, read):
        assert (result.status, result.dsn) == ("bounced", "5.2.0")
        assert result.reply.endswith(f"destination {fifo} is not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@root_only
def test_mbox_with_a_second_hard_link_is_refused(user, world):
    """A hard link to another file (here the user's own, so only the link count is wrong)
    would append the mail to that file: refused as Postfix's safe_open does."""
    name, uid, gid, home = user
    spool = _spool_1777(world)
    other = home / "other-file"
    other.write_bytes(b"precious\n")
    os.chown(other, uid, gid)
    os.link(other, spool / name)
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("bounced", "5.2.0")
    assert result.reply.endswith(f"cannot open file {spool / name}: file has 2 hard links")
    assert other.read_bytes() == b"precious\n"


@root_only
def test_mbox_that_is_a_symlink_is_refused(user, world):
    name, uid, gid, home = user
    spool = _spool_1777(world)
    target = home / "target"
    target.write_bytes(b"")
    os.chown(target, uid, gid)
    (spool / name).symlink_to(target)
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("bounced", "5.2.0")
    assert result.reply.endswith(f"cannot open file {spool / name}: file is a symbolic link")
    assert target.read_bytes() == b""


LOCK_MANY = """
import fcntl, os, sys
fds = [os.open(path, os.O_WRONLY) for path in sys.argv[1:]]
for fd in fds:
    fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # held until the test closes our stdin
"""


@pytest.mark.parametrize("as_recipient", [False, True], ids=["thread", "child"])
def test_deliveries_waiting_for_locks_leave_the_default_executor_free(user, world, as_recipient):
    """As many mbox deliveries as the loop's default executor has threads, all waiting for
    locks another program holds, in mailbox threads (Tern's own user) or in children (as the
    recipient): a job on the default executor (smtpd's AUTH check uses it) still runs, and
    finishes while every delivery is still waiting; released, they all deliver."""
    if as_recipient and os.geteuid() != 0:
        pytest.skip("needs root (setuid)")
    _, uid, gid, _ = user
    ids = (uid, gid) if as_recipient else (os.geteuid(), os.getegid())
    boxes = world / "boxes"
    boxes.mkdir()
    os.chown(boxes, *ids)
    count = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size
    paths = [boxes / f"u{i}" for i in range(count)]
    for path in paths:
        path.write_bytes(b"")
        os.chown(path, *ids)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_MANY, *map(str, paths)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    config = Config(deliver_lock_attempts=400, deliver_lock_delay=0.05)

    async def scenario():
        tasks = [asyncio.create_task(local_agent.write_mailbox(
            local_agent.Mailbox(str(path), False, *ids), b"From x  now\nhi\n\n", config))
            for path in paths]
        await asyncio.sleep(0)  # each has started: submitted to its thread, or forked
        await asyncio.to_thread(lambda: None)
        waiting = [not task.done() for task in tasks]
        holder.stdin.close()
        await asyncio.gather(*tasks)
        return waiting

    try:
        assert holder.stdout.readline() == b"locked\n"
        assert run(scenario()) == [True] * count
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert [path.read_bytes() for path in paths] == [b"From x  now\nhi\n\n"] * count


def _hanging_writer(monkeypatch, marker):
    """The child's write hangs halfway (it inherits this patch through fork), after noting
    its pid in ``marker``."""
    from engine.delivery import mailbox

    def hang(fd, data):
        os.write(fd, data[: len(data) // 2])
        Path(marker).write_text(str(os.getpid()))
        time.sleep(20)

    monkeypatch.setattr(mailbox, "_write_all", hang)


def _user_spool(user, world):
    name, uid, gid, _ = user
    spool = world / "mail"
    spool.mkdir()
    os.chown(spool, uid, gid)  # the child (the recipient) makes its dotlock here
    mbox = spool / name
    mbox.write_bytes(b"From old  now\nold message\n\n")
    os.chown(mbox, uid, gid)
    return spool, mbox


@root_only
def test_mbox_writer_past_its_time_limit_leaves_no_half_message_nor_lock(user, world,
                                                                        monkeypatch):
    name, *_ = user
    spool, mbox = _user_spool(user, world)
    marker = user[3] / "child"  # the child (the recipient) writes it
    _hanging_writer(monkeypatch, marker)
    monkeypatch.setattr(local_agent, "WRITE_TIME_LIMIT", 1.0)
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("deferred", "4.2.0")
    assert result.reply.endswith(f"mailbox delivery to {mbox} timed out")
    assert marker.exists()  # half the message had been written
    assert mbox.read_bytes() == b"From old  now\nold message\n\n"
    assert sorted(os.listdir(spool)) == [name]  # no dotlock
    with pytest.raises(ChildProcessError):
        os.waitpid(int(marker.read_text()), os.WNOHANG)  # killed and reaped


@root_only
def test_cancelled_mbox_delivery_kills_the_child_and_undoes_its_write(user, world,
                                                                     monkeypatch):
    """The delivery task cancelled (the queue manager stopping) while the child writes: the
    child is killed and reaped, the half message cut off and the dotlock removed, then the
    cancellation goes on."""
    name, *_ = user
    spool, mbox = _user_spool(user, world)
    marker = user[3] / "child"  # the child (the recipient) writes it
    _hanging_writer(monkeypatch, marker)
    config = Config(mail_spool_directory=str(spool), deliver_lock_attempts=1)

    async def scenario():
        task = asyncio.create_task(local_agent.deliver(request([f"{name}@example.test"]),
                                                       config))
        for _ in range(500):
            if marker.exists() and marker.read_text():
                break
            await asyncio.sleep(0.01)
        assert mbox.stat().st_size > len(b"From old  now\nold message\n\n")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ChildProcessError):
            os.waitpid(int(marker.read_text()), os.WNOHANG)  # killed and reaped

    run(scenario())
    assert mbox.read_bytes() == b"From old  now\nold message\n\n"
    assert sorted(os.listdir(spool)) == [name]


def test_maildir_file_and_its_new_directory_entry_are_synced(tmp_path, monkeypatch):
    """Before the recipient is marked sent, the message's data and its name in new/ are on
    disk: fsync of the file, then of the new/ directory after the link."""
    from engine.delivery import mailbox

    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(mailbox.os, "fsync", record)
    path = mailbox.deliver_maildir(str(tmp_path / "Maildir"), b"Subject: s\n\nbody\n")
    assert Path(path).parent == tmp_path / "Maildir" / "new"
    assert synced == [False, True]  # the file, then the directory holding its new name


@root_only
def test_a_killed_writers_undo_never_acts_as_root_in_the_users_directory(user, world,
                                                                         monkeypatch):
    """The user stops its own writer child and swaps ~/Mail for a link to a root-owned
    directory: the undo (lock removal, truncation) runs with the user's identity, so the
    root-owned file named like the dotlock there stays."""
    from engine.delivery import mailbox

    name, uid, gid, home = user
    (home / "Mail").mkdir()
    os.chown(home / "Mail", uid, gid)
    victim = world / "victim"
    victim.mkdir()
    (victim / "inbox.lock").write_text("root's\n")
    marker = home / "child"

    def hang_and_swap(fd, data):  # in the child, as the user: what the user could do
        os.write(fd, data[: len(data) // 2])
        os.rename(home / "Mail", home / "Mail.old")
        os.symlink(victim, home / "Mail")
        Path(marker).write_text(str(os.getpid()))
        time.sleep(20)

    monkeypatch.setattr(mailbox, "_write_all", hang_and_swap)
    monkeypatch.setattr(local_agent, "WRITE_TIME_LIMIT", 1.0)
    config = Config(home_mailbox="Mail/inbox", deliver_lock_attempts=1)
    (result,) = run(local_agent.deliver(request([f"{name}@example.test"]), config)).results
    assert (result.status, result.dsn) == ("deferred", "4.2.0")
    assert marker.exists()
    assert (victim / "inbox.lock").read_text() == "root's\n"
