"""Mailbox files: Maildir and mbox writes, as Postfix's local(8) and virtual(8) make them.

Plain, blocking file operations with no knowledge of users or the queue: engine.delivery.local
runs them in a thread, or, to write with a recipient's identity when Tern runs as root, in a
forked child that takes that uid/gid first, so the serving process never changes identity. A
failure is a MailboxError whose ``transient`` says defer or bounce.
"""

import errno
import fcntl
import os
import platform
import stat
import time

LOCK_ATTEMPTS = 20  # Postfix's deliver_lock_attempts
LOCK_DELAY = 1.0  # Postfix's deliver_lock_delay (seconds)
STALE_LOCK_TIME = 500  # Postfix's stale_lock_time: a dotlock older than this is removed


class MailboxError(Exception):
    def __init__(self, dsn: str, text: str) -> None:
        super().__init__(text)
        self.dsn = dsn
        self.text = text

    @property
    def transient(self) -> bool:
        return self.dsn.startswith("4")


def delivery_headers(sender: str, recipient: str) -> bytes:
    """What local(8) prepends: Return-Path (the envelope sender) and Delivered-To."""
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()


def unix_lines(content: bytes) -> bytes:
    """Mailbox files hold LF line ends, as Postfix writes them."""
    return content.replace(b"\r\n", b"\n")


_counter = 0


def maildir_name() -> str:
    """A unique file name (Maildir's time.unique.host, with microseconds, PID and a counter:
    unique within this host even for two deliveries in one microsecond)."""
    global _counter
    _counter += 1
    now = time.time()
    host = platform.node().replace("/", "\\057").replace(":", "\\072")  # gethostname()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{_counter}R{os.urandom(4).hex()}.{host}"


def deliver_maildir(directory: str, data: bytes) -> str:
    """Write ``data`` into the Maildir ``directory`` (made with mode 0700 if missing): a 0600
    file in tmp/, synced, then linked into new/ (never overwriting) and unlinked from tmp/.
    Returns the new file's path."""
    try:
        for sub in ("", "tmp", "new", "cur"):
            os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
        name = maildir_name()
        tmp = os.path.join(directory, "tmp", name)
        new = os.path.join(directory, "new", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.link(tmp, new)  # fails rather than replace an existing file
        finally:
            os.unlink(tmp)
        _sync_directory(os.path.join(directory, "new"))
        return new
    except OSError as exc:
        raise _os_error(f"maildir delivery failed: create maildir file {directory}", exc) from None


def _sync_directory(path: str) -> None:
    """fsync a directory, so a name just linked into it survives a crash: the queue marks the
    recipient sent right after, and Tern's contract is that sent means on disk (Postfix's
    local(8) leaves this to the file system)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mbox_quote(content: bytes) -> bytes:
    """The body with ">" before every line that starts with "From " (mbox "From " quoting)."""
    if content.startswith(b"From "):
        content = b">" + content
    return content.replace(b"\nFrom ", b"\n>From ")


def mbox_entry(sender: str, data: bytes, now: float | None = None) -> bytes:
    """One mbox message: the "From sender date" line, the quoted message and an empty line."""
    stamp = time.asctime(time.localtime(now))
    body = mbox_quote(data)
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {sender or 'MAILER-DAEMON'}  {stamp}\n".encode() + body + b"\n"


class Privileges:
    """How deliver_mbox changes the process's effective identity between its two phases, as
    Postfix's local(8) does with set_eugid(): ``locking`` (create the dotlock, open or create
    the file, remove the lock: the mail spool's privileges) and ``writing`` (append the
    message: the recipient's). ``chown``: who a newly created file is given to, when the
    locking identity is not the recipient (root in a root-only spool). This default changes
    nothing: the caller already has the one identity for everything."""

    chown: tuple[int, int] | None = None

    def locking(self) -> None:
        pass

    def writing(self) -> None:
        pass


SAME_PRIVILEGES = Privileges()


def _quiet(step: str) -> None:
    pass


def deliver_mbox(path: str, entry: bytes, attempts: int = LOCK_ATTEMPTS,
                 delay: float = LOCK_DELAY, owner: int | None = None,
                 privileges: Privileges = SAME_PRIVILEGES, progress=_quiet,
                 regular_only: bool = True) -> None:
    """Append ``entry`` to the mbox file ``path`` (made 0600 if missing) under both of
    Postfix's default locks: a ``path.lock`` dotlock and an fcntl lock. A lock held by someone
    else is retried ``attempts`` times, ``delay`` apart, then the delivery defers (4.2.0). The
    file must have one link, be a plain file (unless not ``regular_only``) and be owned by
    ``owner`` when given (see open_mbox). A
    failed write truncates the file back, so no half message stays. ``progress`` hears each
    step ("locked", "writing SIZE DEV INO", "written", "unlocked"): what someone who kills
    this writer must undo (engine.delivery.writer.undo_mbox)."""
    lock = path + ".lock"
    # local(8)'s file destinations lock with MBOX_DOT_LOCK_MAY_FAIL: a /dev/null alias or a
    # file in a directory the writer cannot add to is written under the fcntl lock alone
    locked = _dotlock(lock, attempts, delay, may_fail=not regular_only)
    if locked:
        progress("locked")
    try:
        fd = open_mbox(path, owner, privileges.chown, regular_only)
        try:
            privileges.writing()
            _fcntl_lock(fd, path, attempts, delay)
            info = os.fstat(fd)
            size = info.st_size
            progress(f"writing {size} {info.st_dev} {info.st_ino}")
            try:
                _write_all(fd, entry)
                if stat.S_ISREG(info.st_mode):  # a device (/dev/null) has nothing to sync
                    os.fsync(fd)
                progress("written")
            except OSError as exc:
                os.ftruncate(fd, size)
                raise _os_error(f"error writing message to file {path}", exc) from None
        finally:
            os.close(fd)  # also releases the fcntl lock
    finally:
        if locked:
            privileges.locking()
            os.unlink(lock)
            progress("unlocked")


def open_mbox(path: str, owner: int | None = None, chown: tuple[int, int] | None = None,
              regular_only: bool = True) -> int:
    """Open (or create, 0600) the mbox file for appending, as Postfix's safe_open and local(8)
    do: never through a symbolic link, never blocking (a FIFO put there by someone else must
    not hang the delivery), and only a regular file with exactly one hard link (a link to
    another file would append the mail there). With ``owner`` (Postfix's
    strict_mailbox_ownership, when Tern writes as the recipient) a file owned by anyone else
    defers: another local user may have created it first to read the mail. With ``chown``, a
    file this call creates is given to that uid/gid (only one it created: O_EXCL). Not
    ``regular_only``: a file destination of an alias (local(8)'s deliver_file), where a device
    such as /dev/null is fine, and an executable file bounces (5.7.1)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        if chown is None:
            fd = os.open(path, flags | os.O_CREAT, 0o600)
        else:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                fd = os.open(path, flags)
            else:
                try:
                    os.fchown(fd, *chown)
                except OSError:
                    os.close(fd)
                    raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MailboxError("5.2.0", f"cannot open file {path}: file is a symbolic link"
                               ) from None
        if exc.errno == errno.ENXIO and regular_only:  # a FIFO or socket with no reader
            raise MailboxError("5.2.0", f"destination {path} is not a regular file") from None
        raise _os_error(f"cannot open file {path}", exc) from None
    try:
        info = os.fstat(fd)
        if regular_only and not stat.S_ISREG(info.st_mode):
            raise MailboxError("5.2.0", f"destination {path} is not a regular file")
        if not regular_only and stat.S_ISREG(info.st_mode) and info.st_mode & stat.S_IXUSR:
            # local(8)'s deliver_file: never append mail to a program someone may run
            raise MailboxError("5.7.1", f"destination file {path} is executable")
        if info.st_nlink != 1:
            raise MailboxError("5.2.0", f"cannot open file {path}: file has {info.st_nlink} "
                                        f"hard links")
        if owner is not None and info.st_uid != owner:
            raise MailboxError("4.2.0", f"destination {path} is not owned by recipient")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _dotlock(lock: str, attempts: int, delay: float, may_fail: bool = False) -> bool:
    """Take the dotlock ``lock`` (True). With ``may_fail``, a lock that cannot be created at
    all (no permission, read-only directory) is done without (False); one held by someone
    else is still waited for."""
    for attempt in range(attempts):
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return True
        except FileExistsError:
            try:
                if time.time() - os.stat(lock).st_mtime > STALE_LOCK_TIME:
                    os.unlink(lock)  # left by a crashed writer (Postfix's stale_lock_time)
                    continue
            except FileNotFoundError:
                continue
        except OSError as exc:
            if may_fail and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return False
            raise _os_error(f"cannot create dotlock {lock}", exc, transient=True) from None
        if attempt + 1 < attempts:
            time.sleep(delay)
    raise MailboxError("4.2.0", f"cannot update mailbox {lock[:-5]}: unable to lock for "
                                f"exclusive access: {lock}: File exists")


def _fcntl_lock(fd: int, path: str, attempts: int, delay: float) -> None:
    for attempt in range(attempts):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise _os_error(f"cannot lock {path}", exc, transient=True) from None
        if attempt + 1 < attempts:
            time.sleep(delay)
    raise MailboxError("4.2.0", f"cannot update mailbox {path}: unable to lock for exclusive "
                                f"access: Resource temporarily unavailable")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _os_error(what: str, exc: OSError, transient: bool = True) -> MailboxError:
    """As Postfix's local: a file problem defers (5.2.2 only for a full mailbox quota)."""
    if exc.errno in (errno.EDQUOT, errno.EFBIG):
        return MailboxError("5.2.2", f"{what}: {exc.strerror}")
    return MailboxError("4.2.0" if transient else "5.2.0", f"{what}: {exc.strerror}")
