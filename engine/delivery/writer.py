"""Where mailbox writes run, off the event loop: a thread of their own small pool, or a forked
child that takes the recipient's identity (engine.delivery.local decides which).

Both kinds can wait long: for a mailbox lock another program holds (deliver_lock_attempts ×
deliver_lock_delay, slept through), or on a slow disk. So neither may hold a thread of the
loop's default executor, which smtpd's AUTH checks and others share: threads come from
MAILBOX_THREADS of their own, and a child is waited for through a pidfd the loop polls (Linux
5.3+), no thread at all.

A child that outlives its time limit, or whose delivery is cancelled (the queue manager
stopping), is killed with SIGKILL and reaped before the caller goes on; for an mbox, what it
left is undone then, by a new child with the same identity (never as root on a path the user
controls): the file truncated back to its size before the message, and its dotlock removed
(the child reports both steps through its pipe as it takes them).
"""

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import os
import signal

from engine.delivery.mailbox import SAME_PRIVILEGES, MailboxError, Privileges

MAILBOX_THREADS = 8  # threads for mailbox writes made as Tern itself
REPORT_LIMIT = 4000  # bytes of a child's error report
UNDO_TIME_LIMIT = 10.0  # seconds for the child undoing a killed writer's steps

_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """Made on first use, in the process that writes (never before a worker fork)."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(MAILBOX_THREADS, "tern-mailbox")
    return _pool


async def in_thread(work, *args):
    """``work(*args)`` in a mailbox thread, as Tern's own user: a write, or an alias
    expansion (which reads .forward and include files through forked children); its
    result."""
    return await asyncio.get_running_loop().run_in_executor(_executor(),
                                                            functools.partial(work, *args))


async def as_user(uid: int, gid: int, time_limit: float, write, *args, privileges=None,
                  mbox: str | None = None) -> None:
    """Run ``write(*args)`` in a forked child that first drops to ``uid``/``gid`` (no
    supplementary groups, umask 077), or enters ``privileges`` (``privileges.enter()``; write
    switches between its identities). No exec: the child only runs already imported code and
    plain system calls, then _exit()s; its MailboxError comes back through a pipe. ``mbox``:
    the mbox file ``write`` appends to (deliver_mbox, given ``progress=``), undone if the child
    is killed."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            # only the report pipe: a copy of any other descriptor (a client's connection,
            # another child's pipe) would keep it open while this child lives
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            _become(uid, gid, privileges)
            os.umask(0o077)
            if mbox is None:
                write(*args)
            else:
                write(*args, progress=lambda line: os.write(write_fd, line.encode() + b"\n"))
            code = 0
        except MailboxError as exc:
            code = 75 if exc.transient else 1
            os.write(write_fd, f"E {exc.dsn} {exc.text}".encode()[:REPORT_LIMIT])
        except BaseException as exc:  # noqa: BLE001 - reported, and the child must _exit
            with contextlib.suppress(BaseException):
                os.write(write_fd, f"E 4.3.0 mailbox writer failed: {exc!r}"
                         .encode()[:REPORT_LIMIT])
        finally:
            os._exit(code)
    os.close(write_fd)
    status = None
    try:
        async with asyncio.timeout(time_limit):
            status = await _exit_status(pid)
    except TimeoutError:
        raise MailboxError("4.2.0", f"mailbox delivery to {args[0]} timed out") from None
    finally:
        try:
            if status is None:  # timed out or cancelled: killed and reaped before going on
                os.kill(pid, signal.SIGKILL)
                killed = await asyncio.shield(_exit_status(pid))
                if killed == -signal.SIGKILL and mbox is not None:
                    await asyncio.shield(_undo_as(uid, gid, privileges, mbox,
                                                  _drain(read_fd)))
            else:
                report = _drain(read_fd)
        finally:
            os.close(read_fd)
    if status != 0:
        dsn, _, text = report.partition(b"E ")[2].decode("utf-8", "replace").partition(" ")
        if not text or dsn[:1] not in "45":
            dsn, text = "4.3.0", f"mailbox writer failed with status {status}"
        raise MailboxError(dsn, text)


def _become(uid: int, gid: int, privileges) -> None:
    """In a child: the writer's identity (``privileges.enter()``, or ``uid``/``gid`` with no
    supplementary groups)."""
    if privileges is not None:
        privileges.enter()
    else:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


async def _undo_as(uid: int, gid: int, privileges, path: str, report: bytes) -> None:
    """undo_mbox in a new child with the killed writer's identity: ``path`` is the user's
    to change (a home mailbox's directory swapped for a link while the writer was stopped),
    so root never truncates or unlinks there. Killed past UNDO_TIME_LIMIT (the user may stop
    this child too: what it leaves is the user's own mailbox lock)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            _become(uid, gid, privileges)
            undo_mbox(path, report, privileges or SAME_PRIVILEGES)
        finally:
            os._exit(0)
    try:
        async with asyncio.timeout(UNDO_TIME_LIMIT):
            await _exit_status(pid)
            return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    await _exit_status(pid)


async def _exit_status(pid: int) -> int:
    """Wait for the child to end (its pidfd polled by the loop), reap it, its exit code."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # no pidfd (Linux before 5.3): a mailbox thread waits instead
        if exc.errno != errno.ENOSYS:
            raise
        loop = asyncio.get_running_loop()
        _, status = await loop.run_in_executor(_executor(), os.waitpid, pid, 0)
        return os.waitstatus_to_exitcode(status)
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    try:
        loop.add_reader(pidfd, lambda: ended.done() or ended.set_result(None))
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)  # it has ended: no wait
    return os.waitstatus_to_exitcode(status)


def _drain(read_fd: int) -> bytes:
    """What the ended child wrote (a few small lines: the pipe never filled), read without
    blocking."""
    os.set_blocking(read_fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks)


def undo_mbox(path: str, report: bytes, privileges: Privileges = SAME_PRIVILEGES) -> None:
    """After a killed mbox child, in a child with its identity (_undo_as): truncate the file
    back to the size it reported before writing (the same file: device and inode match;
    under its fcntl lock, so another writer's later message is never cut; as ``privileges``
    write), then remove the dotlock it reported taking (as they lock). Steps it reported
    finished (its message "written", the lock "unlocked") are left alone."""
    steps = report.partition(b"E ")[0].split(b"\n")
    if b"locked" not in steps or b"unlocked" in steps:
        return  # the dotlock was never, or is no longer, its own
    writing = [step.split() for step in steps if step.startswith(b"writing ")]
    privileges.writing()
    if writing and b"written" not in steps:
        size, dev, ino = map(int, writing[-1][1:4])
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) == (dev, ino) and info.st_size > size:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)  # and its lock
    privileges.locking()
    with contextlib.suppress(OSError):
        os.unlink(path + ".lock")
