"""Reading a ``.forward`` or ``:include:`` file with the delivery rights, as Postfix's
dotforward.c and include.c open them (open_as): never as root on a user's behalf.

A local user chooses these paths (a .forward may name any include file, an address extension
picks the .forward name), so the open happens with the rights' uid and gid and no
supplementary groups, in a forked child when Tern is root and the rights are someone else's
(Tern's own identity never changes). The open is non-blocking (a FIFO swapped in for the file
cannot stall the caller), the opened descriptor is what is checked (fstat: no race between a
check and the open), only a regular file is read, and only whole: one longer than ``limit``
bytes is an error (EFBIG), never a cut text parsed as if complete. The child has a time limit;
past it, it is killed and reaped.
"""

import contextlib
import errno
import gc
import os
import select
import signal
import stat
import time
from dataclasses import dataclass

# what an open reports for a file that is not there for this user (a missing file or
# directory, a symbolic link refused, no permission): any other error is a failure to read
ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.ENAMETOOLONG})
READ_TIME_LIMIT = 10.0  # seconds for a child to open and read one file
_HEADER = 64  # bytes of the child's "OK uid mode" or "E errno" line, at most


@dataclass(frozen=True)
class UserFile:
    """What was opened: its owner and mode (from fstat of the open descriptor), and its text
    (None when it is not a regular file: then nothing was read)."""

    uid: int
    mode: int
    text: str | None


def read_as(path: str, uid: int, gid: int, *, follow: bool, limit: int,
            time_limit: float = READ_TIME_LIMIT) -> UserFile:
    """Open ``path`` as ``uid``/``gid`` (``follow``: a symbolic link as the last component is
    followed; a .forward's is not), fstat it and read a regular file of at most ``limit`` bytes.
    Raises OSError (the open's or stat's error; EFBIG for a longer file; TimeoutError past
    ``time_limit``; the reading machinery's own: a failed pipe or fork, EIO for a child that
    died without a report). Only the open's errors in ABSENT mean there is no such file."""
    if time_limit <= 0:  # no time left: no child forked only to be killed at once
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT), path)
    if os.geteuid() != 0 or uid == 0:
        return _open_read(path, follow, limit)  # already this identity: nothing to drop
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except BaseException:  # EAGAIN, ENOMEM: no child, and no pipe left open
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # the child: never returns
        try:
            # a copy of a threaded process: a finalizer run by the collector here could wait
            # for a lock some other (absent) thread held at the fork
            gc.disable()
            # only the report pipe: a copy of another descriptor (a client's connection)
            # would stay open as long as this child, which the user may stop
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                found = _open_read(path, follow, limit, raw=True)
            except OSError as exc:
                _write_all(write_fd, f"E {exc.errno or 0}\n".encode())
            else:
                _write_all(write_fd, f"OK {found.uid} {found.mode} {found.text is not None}\n"
                           .encode() + (found.text or b""))
        finally:
            os._exit(0)
    os.close(write_fd)
    report = None
    try:
        report = _collect(read_fd, _HEADER + limit, time.monotonic() + time_limit)
    finally:
        os.close(read_fd)
        if report is None:  # timed out (or failed): killed, then reaped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if report is None:
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT), path)
    head, _, data = report.partition(b"\n")
    fields = head.split()
    if fields[:1] != [b"OK"] or len(fields) != 4:
        code = int(fields[1]) if len(fields) == 2 and fields[1].isdigit() else 5  # EIO
        raise OSError(code, os.strerror(code), path)
    text = data[:limit].decode("utf-8", "replace") if fields[3] == b"True" else None
    return UserFile(int(fields[1]), int(fields[2]), text)


def _open_read(path: str, follow: bool, limit: int, raw: bool = False) -> UserFile:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        data = None
        if stat.S_ISREG(info.st_mode):
            chunks, left = [], limit + 1  # one byte more: a file that does not fit is seen
            while left > 0 and (chunk := os.read(fd, min(left, 65536))):
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            if len(data) > limit:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path)
    finally:
        os.close(fd)
    text = data if raw or data is None else data.decode("utf-8", "replace")
    return UserFile(info.st_uid, info.st_mode, text)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _collect(fd: int, limit: int, deadline: float) -> bytes | None:
    """The child's report until it closes the pipe (at most ``limit`` bytes kept); None past
    the deadline."""
    chunks, size = [], 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        if size < limit:
            chunks.append(chunk[:limit - size])
            size += len(chunks[-1])
