"""Input buffer of an SMTP server session: splits client bytes into command lines and DATA payload.

Pure-Python twin of ``_speedups/reader.pyx`` (same class, same results; see engine.speedups).
Trusts nothing: every byte comes from the client. Memory is bounded by the line limit for
commands; DATA and BDAT payload is released as it arrives, never accumulated here.
"""

CR = 13
LF = 10
DOT = 46


class LineTooLong(Exception):
    """A command line exceeded the limit; the rest of that line is discarded.

    RFC 5321 §4.5.3.1.4 (command line length)."""


class Reader:
    """h11-style receive buffer. ``feed`` bytes, then ``read_line`` in command mode or
    ``read_data`` in DATA mode. Never rescans bytes it already searched for a line end."""

    __slots__ = ("_buf", "_scanned", "_max_line", "_discarding", "_at_line_start")

    def __init__(self, max_line_length: int = 2048) -> None:
        self._buf = bytearray()
        self._scanned = 0  # prefix of _buf known to hold no LF
        self._max_line = max_line_length
        self._discarding = False  # inside an over-long line: drop through the next LF
        self._at_line_start = True  # DATA: the next byte begins a line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def read_line(self) -> bytes | None:
        """The next command line without its line end (CRLF, or a bare LF as Postfix accepts),
        or None while incomplete. Raises LineTooLong once for a line over the limit."""
        buf = self._buf
        while True:
            nl = buf.find(b"\n", self._scanned)
            if self._discarding:
                if nl < 0:
                    buf.clear()
                    self._scanned = 0
                    return None
                del buf[: nl + 1]
                self._scanned = 0
                self._discarding = False
                continue
            if nl < 0:
                if len(buf) > self._max_line + 1:
                    buf.clear()
                    self._scanned = 0
                    self._discarding = True
                    raise LineTooLong()
                self._scanned = len(buf)
                return None
            end = nl - 1 if nl > 0 and buf[nl - 1] == CR else nl
            self._scanned = 0
            if end > self._max_line:
                del buf[: nl + 1]
                raise LineTooLong()
            line = bytes(buf[:end])
            del buf[: nl + 1]
            return line

    def start_data(self) -> None:
        """Enter DATA mode: the next byte begins the first line of the message."""
        self._at_line_start = True
        self._scanned = 0

    def read_data(self) -> tuple[bytes, bool]:
        """Unstuffed DATA payload available so far, and whether end-of-data was reached.

        RFC 5321 §4.5.2: a leading '.' is removed from each line; a line of just '.' ends the
        data. Only CRLF begins a line here, so a bare LF or CR never ends DATA (the smuggling
        class). The payload keeps its CRLFs; bytes after the end stay buffered for read_line.
        Work is per dot-led line, not per line: the scan is ``find(b"\\r\\n.")``.
        """
        buf = self._buf
        n = len(buf)
        pos = 0
        out = []
        self._scanned = 0  # a prefix of buf may be consumed below: forget the line-end search
        if self._at_line_start:
            verdict = self._dot_line(0, n)
            if verdict == 0:
                return b"", False
            if verdict == 2:
                del buf[:3]
                self._at_line_start = True
                return b"", True
            self._at_line_start = False
            pos = 1 if verdict == 1 else 0
        while True:
            k = buf.find(b"\r\n.", pos)
            if k < 0:
                keep = 2 if n - pos >= 2 and buf[n - 2] == CR and buf[n - 1] == LF else (
                    1 if n > pos and buf[n - 1] == CR else 0)
                out.append(buf[pos : n - keep])
                pos = n - keep
                break
            out.append(buf[pos : k + 2])
            verdict = self._dot_line(k + 2, n)
            if verdict == 0:
                pos = k + 2
                self._at_line_start = True
                break
            if verdict == 2:
                del buf[: k + 5]
                self._at_line_start = True
                return b"".join(out), True
            pos = k + 3  # stuffed dot dropped
        del buf[:pos]
        return b"".join(out), False

    def _dot_line(self, at: int, n: int) -> int:
        """Classify the line starting at ``at``: 0 = undecided (need more bytes),
        1 = starts with a stuffed dot, 2 = the end-of-data line, 3 = ordinary line."""
        buf = self._buf
        if at >= n:
            return 0
        if buf[at] != DOT:
            return 3
        if at + 1 >= n:
            return 0
        if buf[at + 1] != CR:
            return 1
        if at + 2 >= n:
            return 0
        return 2 if buf[at + 2] == LF else 1

    def read_exact(self, count: int) -> bytes:
        """Up to ``count`` bytes exactly as buffered (b"" when none), consumed: a BDAT chunk's
        payload (RFC 3030 §2). No line scanning, no dot-unstuffing; what follows the count stays
        buffered for read_line."""
        buf = self._buf
        take = min(count, len(buf)) if count > 0 else 0
        self._scanned = 0  # a prefix of buf is consumed: forget the line-end search
        if take == 0:
            return b""
        chunk = bytes(buf[:take])
        del buf[:take]
        return chunk
