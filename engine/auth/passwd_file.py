"""Dovecot's passwd-file: ``user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]`` per line.

Read at start-up (a malformed line stops it, naming file:line), and again whenever the file
changes on disk (as Dovecot does), so ``tern passwd`` takes effect without a restart; a change
that does not parse keeps the last good table. ``set_password`` rewrites one user's line
atomically. Trusts the administrator's file for its hashes; user names and passwords checked
against it come from SMTP clients and are only looked up and compared.
"""

import contextlib
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.auth import schemes


class PasswdFileError(Exception):
    """A passwd-file that cannot be used: ``str()`` names the file and, for a bad line, the
    line number (``/etc/tern/passwd:7: …``)."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Entry:
    username: str  # as written in the file
    scheme: str  # BLF-CRYPT, SHA512-CRYPT, ARGON2ID, ARGON2I, PLAIN, CLEARTEXT
    stored: str  # the hash (or cleartext) after the {SCHEME} prefix


def parse(text: str, path: str | os.PathLike = "passwd") -> dict[str, Entry]:
    """The entries of a passwd-file, by lower-cased user name (Dovecot's default
    ``auth_username_format = %Lu`` makes names case-insensitive). Blank lines and ``#``
    comments are skipped. Raises PasswdFileError naming the line of the first problem."""
    entries: dict[str, Entry] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        username, colon, rest = line.partition(":")
        if not colon or not username:
            raise PasswdFileError(path, 'expected "user:{SCHEME}hash"', number)
        if username != username.strip() or any(ord(c) < 33 or ord(c) == 127 for c in username):
            raise PasswdFileError(path, f"user name {username!r} has spaces or control "
                                        "characters", number)
        password = rest.partition(":")[0]
        if not password:
            raise PasswdFileError(path, f"user {username}: no password", number)
        try:
            scheme, stored = schemes.scheme_of(password)
        except ValueError as error:
            raise PasswdFileError(path, f"user {username}: {error}", number) from None
        key = username.lower()
        if key in entries:
            raise PasswdFileError(path, f"user {username} is already on line "
                                        f"{first_line[key]}", number)
        entries[key] = Entry(username, scheme, stored)
        first_line[key] = number
    return entries


def load(path: str | os.PathLike) -> dict[str, Entry]:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise PasswdFileError(path, f"cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PasswdFileError(path, "not UTF-8 text",
                              data.count(b"\n", 0, error.start) + 1) from None
    return parse(text, path)


class PasswordFile:
    """The credentials of one passwd-file, re-read when the file changes. ``authenticate``
    blocks for the length of a hash (tens of ms): call it off the event loop."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self._entries = load(self.path)
        self._lock = threading.Lock()  # one reload at a time from the executor's threads
        self.reload_error: str | None = None  # the last failed reload's message, for the log

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp or stamp is None:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                self._entries = load(self.path)
            except PasswdFileError as error:
                self.reload_error = str(error)  # keep the last good table
            self._stamp = stamp

    def take_reload_error(self) -> str | None:
        """The last failed reload's message, once (for one log line per bad change)."""
        error, self.reload_error = self.reload_error, None
        return error

    def authenticate(self, username: str, password: bytes) -> str | None:
        """The user's name as the file spells it when the password matches, else None."""
        self._refresh()
        entries = self._entries
        entry = entries.get(username.lower())
        if entry is None:
            # an unknown name costs what a wrong password does: the timing does not tell
            # which names exist (a random password against an entry of the file)
            if (decoy := next(iter(entries.values()), None)) is not None:
                schemes.verify(decoy.scheme, decoy.stored, secrets.token_bytes(16))
            return None
        if schemes.verify(entry.scheme, entry.stored, password):
            return entry.username
        return None

    def __contains__(self, username: str) -> bool:
        return username.lower() in self._entries


def set_password(path: str | os.PathLike, username: str, hashed: str) -> bool:
    """Write ``username:hashed`` into the passwd-file, replacing that user's password field
    (other fields and every other line kept), or appending a new line; creates the file.

    Atomic: a temporary file in the same directory, synced, renamed over the old one, so a
    server reading it sees the old file or the new one, never half of one. A new file is mode
    0600; an existing one keeps its mode. True when the user was already there."""
    path = Path(path)
    check_username(username)
    try:
        text = path.read_text(encoding="utf-8")
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        text, mode = "", 0o600
    parse(text, path)  # refuse to rewrite a file that does not parse
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    replaced = False
    for index, line in enumerate(lines):
        name, colon, rest = line.partition(":")
        if colon and not line.lstrip().startswith("#") and name.lower() == username.lower():
            fields = rest.split(":")
            fields[0] = hashed
            lines[index] = ":".join([name, *fields])
            replaced = True
    if not replaced:
        lines.append(f"{username}:{hashed}")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), mode)
            out.write("\n".join(lines) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return replaced


def check_username(username: str) -> None:
    """A name a passwd-file line can hold: raises ValueError otherwise."""
    if not username or ":" in username or username.startswith("#") or any(
            ord(c) < 33 or ord(c) == 127 for c in username):
        raise ValueError(f"bad user name {username!r}: it must be non-empty, without spaces, "
                         "control characters or ':', and not start with '#'")
