"""Input buffer of an SMTP server session: splits client bytes into command lines and DATA payload.

Pure-Python twin of ``_speedups/reader.pyx`` (same class, same results; see engine.speedups).
Trusts nothing: every byte comes from the client. Memory is bounded by the line limit for
commands; DATA and BDAT payload is released as it arrives, never accumulated here.

Bare line feeds (Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``): a command line may
end in a bare LF; in DATA a line ending in a bare LF is passed on ending in CRLF, and only
``<CR><LF>.<CR><LF>`` after a CRLF-ended line ends the data (a "." line that follows a bare LF,
or ends in one, is content). ``bare_lf`` records that one was seen, for the ``reject`` setting.
Input without a bare LF never leaves the fast path.
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

    __slots__ = ("_buf", "_scanned", "_max_line", "_discarding", "_at_line_start", "_prev_bare",
                 "bare_lf")

    def __init__(self, max_line_length: int = 2048) -> None:
        self._buf = bytearray()
        self._scanned = 0  # prefix of _buf known to hold no LF
        self._max_line = max_line_length
        self._discarding = False  # inside an over-long line: drop through the next LF
        self._at_line_start = True  # DATA: the next byte begins a line
        self._prev_bare = False  # DATA: the line before ended in a bare LF
        self.bare_lf = False  # a bare LF ended a line (the session reads and clears it)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def peek(self, count: int) -> bytes:
        """Up to ``count`` buffered bytes, not consumed (for a log line)."""
        return bytes(self._buf[: max(count, 0)])

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
            if nl > 0 and buf[nl - 1] == CR:
                end = nl - 1
            else:
                end = nl
                self.bare_lf = True
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
        self._prev_bare = False
        self._scanned = 0

    def read_data(self) -> tuple[bytes, bool]:
        """Unstuffed DATA payload available so far, and whether end-of-data was reached.

        RFC 5321 §4.5.2: a leading '.' is removed from each line; a line of just '.' ends the
        data. Only CRLF begins a line here, so a bare LF or CR never ends DATA (the smuggling
        class). The payload keeps its CRLFs; bytes after the end stay buffered for read_line.
        Work is per dot-led line, not per line: the scan is ``find(b"\\r\\n.")``, once a count
        of LFs against CRLFs has shown there is no bare LF (else ``_read_data_lines``).
        """
        buf = self._buf
        n = len(buf)
        if buf.count(b"\n") != buf.count(b"\r\n"):
            return self._read_data_lines()
        pos = 0
        out = []
        self._scanned = 0  # a prefix of buf may be consumed below: forget the line-end search
        if self._at_line_start:
            verdict = self._dot_line(0, n)
            if verdict == 0:
                return b"", False
            if verdict == 2 and not self._prev_bare:
                del buf[:3]
                self._at_line_start = True
                return b"", True
            self._at_line_start = False
            self._prev_bare = False
            pos = 0 if verdict == 3 else 1
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
                self._prev_bare = False  # the line before this one ended in the CRLF at k
                break
            if verdict == 2:
                del buf[: k + 5]
                self._at_line_start = True
                return b"".join(out), True
            pos = k + 3  # stuffed dot dropped
        del buf[:pos]
        return b"".join(out), False

    def _read_data_lines(self) -> tuple[bytes, bool]:
        """read_data for input holding a bare LF: line by line, each bare LF passed on as CRLF;
        the end is a "." line ended by CRLF after a line ended by CRLF."""
        buf = self._buf
        n = len(buf)
        pos = 0
        out = []
        self._scanned = 0
        while True:
            if self._at_line_start:
                if pos >= n:
                    break
                if buf[pos] == DOT:
                    if pos + 1 >= n:
                        break
                    if buf[pos + 1] == CR:
                        if pos + 2 >= n:
                            break
                        if buf[pos + 2] == LF and not self._prev_bare:
                            del buf[: pos + 3]
                            return b"".join(out), True
                    pos += 1  # stuffed dot dropped (a "." line that cannot end DATA too)
                self._at_line_start = False
            nl = buf.find(b"\n", pos)
            if nl < 0:
                keep = 1 if n > pos and buf[n - 1] == CR else 0
                out.append(buf[pos : n - keep])
                pos = n - keep
                break
            if nl > pos and buf[nl - 1] == CR:
                out.append(buf[pos : nl + 1])
                self._prev_bare = False
            else:
                out.append(buf[pos:nl])
                out.append(b"\r\n")
                self._prev_bare = True
                self.bare_lf = True
            pos = nl + 1
            self._at_line_start = True
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
