# cython: language_level=3
"""Input buffer of an SMTP server session: splits client bytes into command lines and DATA payload.

Compiled twin of ``engine/smtp/reader.py`` (same class, same results, same exception; see
engine.speedups). Trusts nothing: every byte comes from the client. The buffer is one C array
with a consumed prefix (``_start``) and a live region up to ``_end``; scanning is memchr over it.
Bare line feeds as in the pure twin: a DATA region holding one takes ``_read_data_lines``.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memchr, memcpy, memmove

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

from engine.smtp.reader import LineTooLong

cdef enum:
    CR = 13
    LF = 10
    DOT = 46
    INITIAL_CAPACITY = 4096
    SHRINK_ABOVE = 262144  # an empty buffer larger than this is given back on the next feed

# _dot_line verdicts, as in the pure twin.
cdef enum:
    UNDECIDED = 0
    STUFFED = 1
    END_OF_DATA = 2
    ORDINARY = 3


cdef class Reader:
    """h11-style receive buffer. ``feed`` bytes, then ``read_line`` in command mode or
    ``read_data`` in DATA mode. Never rescans bytes it already searched for a line end."""

    cdef char *_buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _start  # first live byte
    cdef Py_ssize_t _end  # one past the last live byte
    cdef Py_ssize_t _scanned  # live prefix known to hold no LF
    cdef Py_ssize_t _max_line
    cdef bint _discarding  # inside an over-long line: drop through the next LF
    cdef bint _at_line_start  # DATA: the next byte begins a line
    cdef bint _prev_bare  # DATA: the line before ended in a bare LF
    cdef public bint bare_lf  # a bare LF ended a line (the session reads and clears it)

    def __cinit__(self):
        self._buf = <char *>PyMem_Malloc(INITIAL_CAPACITY)
        if self._buf is NULL:
            raise MemoryError()
        self._cap = INITIAL_CAPACITY

    def __dealloc__(self):
        PyMem_Free(self._buf)
        self._buf = NULL

    def __init__(self, Py_ssize_t max_line_length=2048):
        self._start = 0
        self._end = 0
        self._scanned = 0
        self._max_line = max_line_length
        self._discarding = False
        self._at_line_start = True
        self._prev_bare = False
        self.bare_lf = False

    def feed(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def __len__(self):
        return self._end - self._start

    def peek(self, Py_ssize_t count):
        """Up to ``count`` buffered bytes, not consumed (for a log line)."""
        count = max(0, min(count, self._end - self._start))
        return PyBytes_FromStringAndSize(self._buf + self._start, count)

    def read_line(self):
        """The next command line without its line end (CRLF, or a bare LF as Postfix accepts),
        or None while incomplete. Raises LineTooLong once for a line over the limit."""
        cdef Py_ssize_t length, nl, end
        cdef const char *line
        cdef const char *hit
        while True:
            line = self._buf + self._start
            length = self._end - self._start
            nl = -1
            if self._scanned < length:
                hit = <const char *>memchr(line + self._scanned, LF, length - self._scanned)
                if hit is not NULL:
                    nl = hit - line
            if self._discarding:
                if nl < 0:
                    self._clear()
                    return None
                self._consume(nl + 1)
                self._discarding = False
                continue
            if nl < 0:
                if length - 1 > self._max_line:
                    self._clear()
                    self._discarding = True
                    raise LineTooLong()
                self._scanned = length
                return None
            if nl > 0 and line[nl - 1] == CR:
                end = nl - 1
            else:
                end = nl
                self.bare_lf = True
            if end > self._max_line:
                self._consume(nl + 1)
                raise LineTooLong()
            result = PyBytes_FromStringAndSize(line, end)
            self._consume(nl + 1)
            return result

    def start_data(self):
        """Enter DATA mode: the next byte begins the first line of the message."""
        self._at_line_start = True
        self._prev_bare = False
        self._scanned = 0

    def read_data(self):
        """Unstuffed DATA payload available so far, and whether end-of-data was reached.

        RFC 5321 §4.5.2: a leading '.' is removed from each line; a line of just '.' ends the
        data. Only CRLF begins a line here, so a bare LF or CR never ends DATA (the smuggling
        class). The payload keeps its CRLFs; bytes after the end stay buffered for read_line.
        The scan is memchr for '.', then a look back for CRLF; stuffed dots are squeezed out in
        place, so the payload is copied once into the returned bytes.
        """
        cdef char *buf = self._buf + self._start
        cdef Py_ssize_t n = self._end - self._start
        cdef Py_ssize_t pos = 0  # next unread byte
        cdef Py_ssize_t out = 0  # payload so far is buf[:out]
        cdef Py_ssize_t k, keep
        cdef int verdict
        if _has_bare_lf(buf, n):
            return self._read_data_lines()
        if self._at_line_start:
            verdict = _dot_line(buf, 0, n)
            if verdict == UNDECIDED:
                return b"", False
            if verdict == END_OF_DATA and not self._prev_bare:
                self._consume(3)
                self._at_line_start = True
                return b"", True
            self._at_line_start = False
            self._prev_bare = False
            pos = 0 if verdict == ORDINARY else 1
        while True:
            k = _find_crlf_dot(buf, pos, n)
            if k < 0:
                if n - pos >= 2 and buf[n - 2] == CR and buf[n - 1] == LF:
                    keep = 2
                elif n > pos and buf[n - 1] == CR:
                    keep = 1
                else:
                    keep = 0
                out = _squeeze(buf, out, pos, n - keep)
                pos = n - keep
                break
            out = _squeeze(buf, out, pos, k + 2)
            verdict = _dot_line(buf, k + 2, n)
            if verdict == UNDECIDED:
                pos = k + 2
                self._at_line_start = True
                self._prev_bare = False  # the line before this one ended in the CRLF at k
                break
            if verdict == END_OF_DATA:
                self._at_line_start = True
                return self._take(buf, out, k + 5), True
            pos = k + 3  # stuffed dot dropped
        return self._take(buf, out, pos), False

    cdef object _read_data_lines(self):
        """read_data for input holding a bare LF: line by line, each bare LF passed on as CRLF;
        the end is a "." line ended by CRLF after a line ended by CRLF."""
        cdef char *buf = self._buf + self._start
        cdef Py_ssize_t n = self._end - self._start
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t nl, keep
        cdef const char *hit
        out = bytearray()
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
                            self._consume(pos + 3)
                            return bytes(out), True
                    pos += 1  # stuffed dot dropped (a "." line that cannot end DATA too)
                self._at_line_start = False
            hit = <const char *>memchr(buf + pos, LF, n - pos)
            if hit is NULL:
                keep = 1 if n > pos and buf[n - 1] == CR else 0
                out += buf[pos : n - keep]
                pos = n - keep
                break
            nl = hit - buf
            if nl > pos and buf[nl - 1] == CR:
                out += buf[pos : nl + 1]
                self._prev_bare = False
            else:
                out += buf[pos:nl]
                out += b"\r\n"
                self._prev_bare = True
                self.bare_lf = True
            pos = nl + 1
            self._at_line_start = True
        self._consume(pos)
        return bytes(out), False

    def read_exact(self, Py_ssize_t count):
        """Up to ``count`` bytes exactly as buffered (b"" when none), consumed: a BDAT chunk's
        payload (RFC 3030 §2). No line scanning, no dot-unstuffing; what follows the count stays
        buffered for read_line. One copy, into the returned bytes."""
        cdef Py_ssize_t take = self._end - self._start
        if count < take:
            take = count
        self._scanned = 0
        if take <= 0:
            return b""
        return self._take(self._buf + self._start, take, take)

    # -- buffer management -------------------------------------------------------------------

    cdef inline object _take(self, const char *buf, Py_ssize_t out, Py_ssize_t consumed):
        """The payload buf[:out] as bytes; then drop ``consumed`` live bytes."""
        result = PyBytes_FromStringAndSize(buf, out)
        self._consume(consumed)
        return result

    cdef inline void _consume(self, Py_ssize_t count) noexcept:
        self._start += count
        self._scanned = 0
        if self._start == self._end:
            self._start = self._end = 0

    cdef inline void _clear(self) noexcept:
        self._start = self._end = 0
        self._scanned = 0

    cdef int _append(self, const char *data, Py_ssize_t count) except -1:
        cdef Py_ssize_t length = self._end - self._start
        cdef Py_ssize_t capacity
        cdef char *grown
        if count == 0:
            return 0
        if count > PY_SSIZE_T_MAX // 4 - length:
            raise MemoryError()
        if length == 0 and self._cap > SHRINK_ABOVE and count <= INITIAL_CAPACITY:
            grown = <char *>PyMem_Malloc(INITIAL_CAPACITY)
            if grown is not NULL:
                PyMem_Free(self._buf)
                self._buf = grown
                self._cap = INITIAL_CAPACITY
            self._start = self._end = 0
        if self._end + count > self._cap:
            if length + count <= self._cap // 2:
                memmove(self._buf, self._buf + self._start, length)
            else:
                capacity = 2 * (length + count)
                grown = <char *>PyMem_Malloc(capacity)
                if grown is NULL:
                    raise MemoryError()
                memcpy(grown, self._buf + self._start, length)
                PyMem_Free(self._buf)
                self._buf = grown
                self._cap = capacity
            self._start = 0
            self._end = length
        memcpy(self._buf + self._end, data, count)
        self._end += count
        return 0


cdef inline int _dot_line(const char *buf, Py_ssize_t at, Py_ssize_t n) noexcept:
    """Classify the line starting at ``at``: UNDECIDED (need more bytes), STUFFED (starts with
    a stuffed dot), END_OF_DATA (the line '.'), or ORDINARY."""
    if at >= n:
        return UNDECIDED
    if buf[at] != DOT:
        return ORDINARY
    if at + 1 >= n:
        return UNDECIDED
    if buf[at + 1] != CR:
        return STUFFED
    if at + 2 >= n:
        return UNDECIDED
    return END_OF_DATA if buf[at + 2] == LF else STUFFED


cdef inline bint _has_bare_lf(const char *buf, Py_ssize_t n) noexcept:
    """Whether buf[:n] holds an LF not preceded by CR (one at offset 0 counts: the reader never
    consumes a CR without the LF after it). Branch-free, so the C compiler vectorizes it: this
    runs over every DATA byte, and costs less than a memchr per line."""
    cdef const unsigned char *b = <const unsigned char *>buf
    cdef unsigned char found = 0
    cdef Py_ssize_t i
    if n == 0:
        return False
    if b[0] == LF:
        return True
    for i in range(1, n):
        found |= (b[i] == LF) & (b[i - 1] != CR)
    return found != 0


cdef inline Py_ssize_t _find_crlf_dot(const char *buf, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """Offset of the first b"\\r\\n." at or after ``pos`` in buf[:n], or -1. Dots are rarer
    than line ends in mail (none at all in base64), so memchr looks for the dot."""
    cdef Py_ssize_t dot = pos + 2
    cdef const char *hit
    while dot < n:
        hit = <const char *>memchr(buf + dot, DOT, n - dot)
        if hit is NULL:
            return -1
        dot = hit - buf
        if buf[dot - 1] == LF and buf[dot - 2] == CR:
            return dot - 2
        dot += 1
    return -1


cdef inline Py_ssize_t _squeeze(char *buf, Py_ssize_t out, Py_ssize_t begin,
                                Py_ssize_t end) noexcept:
    """Append buf[begin:end] to the payload buf[:out] (out <= begin), in place."""
    cdef Py_ssize_t count = end - begin
    if count > 0 and out != begin:
        memmove(buf + out, buf + begin, count)
    return out + count
