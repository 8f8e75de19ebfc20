# cython: language_level=3
"""RFC 5321 command grammar: the verb split and the MAIL/RCPT path-and-parameter parsing.

Compiled twin of ``engine/smtp/grammar.py`` (same functions, same results, same GrammarError
carrying the same Reply; see engine.speedups). Trusts nothing: every byte comes from the client.
The ASCII hot path scans the line's bytes in C instead of running regular expressions; any
argument holding a non-ASCII character (rare: an error, or a SMTPUTF8 address, RFC 6531) goes to
the pure twin, whose result is by definition the one to give. The RFC 3461 value checks and
the other helpers are the pure twin's own objects, re-exported.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object text)
    const char *PyUnicode_AsUTF8AndSize(object text, Py_ssize_t *size) except NULL

from engine.ipliteral import parse_address_literal
from engine.smtp import grammar as _pure
from engine.smtp import replies
from engine.smtp.grammar import (  # noqa: F401 - the twin's interface
    ENVID_LENGTH_LIMIT,
    MAILBOX,
    ORCPT,
    ORCPT_LENGTH_LIMIT,
    ORCPT_UTF8,
    XTEXT,
    GrammarError,
    Params,
    domain_of,
    dsn_envid,
    dsn_notify,
    dsn_orcpt,
    dsn_ret,
    xtext_decode,
)

cdef enum:
    SP = 32
    LF = 10

# Character classes of the pure twin's regular expressions, one bit each, over ASCII.
cdef enum:
    ATEXT = 1  # [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]
    LETDIG = 2  # [A-Za-z0-9]
    QTEXT = 4  # [\x20\x21\x23-\x5b\x5d-\x7e]
    SPACE = 8  # what str.split() splits on, within ASCII

cdef unsigned char CLASS[128]


cdef void _init_classes() noexcept:
    cdef int c
    for c in range(128):
        CLASS[c] = 0
        if (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122):
            CLASS[c] |= ATEXT | LETDIG
        if c in b"!#$%&'*+/=?^_`{|}~-":
            CLASS[c] |= ATEXT
        if 0x20 <= c <= 0x7e and c != 0x22 and c != 0x5c:
            CLASS[c] |= QTEXT
        if c in b" \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f":
            CLASS[c] |= SPACE


_init_classes()

cdef const char *SURROGATEESCAPE = b"surrogateescape"


cdef inline bint _is(unsigned char c, unsigned char cls) noexcept:
    return c < 128 and (CLASS[c] & cls) != 0


cdef inline unsigned char _upper(unsigned char c) noexcept:
    return c - 32 if 97 <= c <= 122 else c


# -- split_command -----------------------------------------------------------------------------

def split_command(line):
    """The verb (upper case) and the rest of the line. Non-ASCII bytes survive as surrogates."""
    if type(line) is not bytes:
        return _pure.split_command(line)
    cdef const char *s = PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef Py_ssize_t start = 0, end = n, space, rest
    cdef bint ascii = True
    cdef unsigned char buf[64]
    cdef Py_ssize_t i
    while start < end and s[start] == SP:
        start += 1
    while end > start and s[end - 1] == SP:
        end -= 1
    space = start
    while space < end and s[space] != SP:
        if <unsigned char>s[space] >= 128:
            ascii = False
        space += 1
    rest = space
    while rest < end and s[rest] == SP:
        rest += 1
    if ascii and space - start <= 64:
        for i in range(space - start):
            buf[i] = _upper(s[start + i])
        verb = PyUnicode_DecodeASCII(<char *>buf, space - start, NULL)
    else:
        verb = PyUnicode_DecodeUTF8(s + start, space - start, SURROGATEESCAPE).upper()
    return verb, PyUnicode_DecodeUTF8(s + rest, end - rest, SURROGATEESCAPE)


# -- paths ---------------------------------------------------------------------------------------

cdef inline bint _ascii_str(object text) noexcept:
    return type(text) is str and PyUnicode_IS_ASCII(text)


cdef bint _domain(const char *s, Py_ssize_t begin, Py_ssize_t end) noexcept:
    """s[begin:end] matches _DOMAIN: sub-domains of [A-Za-z0-9] with inner hyphens, dot
    separated, one optional trailing dot."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if end > begin and s[end - 1] == b".":
        end -= 1
    if begin >= end:
        return False
    i = begin
    while True:  # at the start of a sub-domain
        if i >= end or not _is(s[i], LETDIG):
            return False
        i += 1
        while i < end:
            c = s[i]
            if c == b".":
                break
            if not (_is(c, LETDIG) or c == b"-"):
                return False
            i += 1
        if s[i - 1] == b"-":
            return False
        if i >= end:
            return True
        i += 1  # the dot


cdef Py_ssize_t _source_route(const char *s, Py_ssize_t begin, Py_ssize_t end) noexcept:
    """The end of a leading _SOURCE_ROUTE (``@a,@b:``) in s[begin:end], or -1. Domains hold no
    ':' or ',', so the route can only end at the first ':' and split at every ','."""
    cdef Py_ssize_t colon = begin, piece, comma
    if begin >= end or s[begin] != b"@":
        return -1
    while colon < end and s[colon] != b":":
        colon += 1
    if colon >= end:
        return -1
    piece = begin
    while True:
        if s[piece] != b"@":
            return -1
        comma = piece + 1
        while comma < colon and s[comma] != b",":
            comma += 1
        if not _domain(s, piece + 1, comma):
            return -1
        if comma >= colon:
            return colon + 1
        piece = comma + 1
        if piece >= colon:
            return -1


cdef tuple _parse_path(object arg, str prefix, object syntax):
    """parse_path for an ASCII ``arg`` and ``prefix``."""
    cdef Py_ssize_t n, plen, i, close, pos
    cdef const char *s = PyUnicode_AsUTF8AndSize(arg, &n)
    cdef const char *p = PyUnicode_AsUTF8AndSize(prefix, &plen)
    if n < plen:
        raise GrammarError(syntax)
    for i in range(plen):
        if _upper(s[i]) != <unsigned char>p[i]:
            raise GrammarError(syntax)
    pos = plen
    while pos < n and s[pos] == SP:
        pos += 1
    if pos >= n or s[pos] != b"<":
        raise GrammarError(syntax)
    close = pos + 1
    while close < n and s[close] != b">":
        if s[close] == b"<":
            raise GrammarError(syntax)
        close += 1
    if close >= n:
        raise GrammarError(syntax)
    for i in range(close + 1, n):
        if s[i] == LF:  # "." in (.*) stops at a newline
            raise GrammarError(syntax)
    if close + 1 < n and s[close + 1] != SP:
        raise GrammarError(syntax)
    i = _source_route(s, pos + 1, close)
    if i >= 0:
        pos = i
    else:
        pos += 1
    address = arg[pos:close]
    # params.strip(" "): it starts with a space (or is empty)
    i = close + 1
    while i < n and s[i] == SP:
        i += 1
    while n > i and s[n - 1] == SP:
        n -= 1
    return address, arg[i:n]


def parse_path(arg, prefix, syntax):
    """``FROM:<addr> params`` → (addr, params). Postfix tolerates a space after the colon."""
    if not (_ascii_str(arg) and _ascii_str(prefix)):
        return _pure.parse_path(arg, prefix, syntax)
    return _parse_path(arg, prefix, syntax)


cdef bint _mailbox(object address) except -1:
    """MAILBOX.fullmatch(address) for an ASCII ``address``, and an address literal that
    engine.ipliteral parses."""
    cdef Py_ssize_t n, i
    cdef const char *s = PyUnicode_AsUTF8AndSize(address, &n)
    cdef unsigned char c
    if n == 0:
        return False
    if s[0] == b'"':  # Quoted-string
        i = 1
        while True:
            if i >= n:
                return False
            c = s[i]
            if c == b'"':
                break
            if c == b"\\":
                if i + 1 >= n or not (0x20 <= <unsigned char>s[i + 1] <= 0x7e):
                    return False
                i += 2
            elif _is(c, QTEXT):
                i += 1
            else:
                return False
        i += 1
    else:  # Dot-string
        i = 0
        while True:
            if i >= n or not _is(s[i], ATEXT):
                return False
            while i < n and _is(s[i], ATEXT):
                i += 1
            if i < n and s[i] == b".":
                i += 1
            else:
                break
    if i >= n or s[i] != b"@":
        return False
    i += 1
    if i < n and s[i] == b"[":
        if n - i < 2 or s[n - 1] != b"]":
            return False
        for c in s[i + 1 : n - 1]:
            if c == b"[" or c == b"]":
                return False
        return parse_address_literal(address[i:]) is not None
    return _domain(s, i, n)


def check_mailbox(address, bad_address, *, allow_bare=frozenset()):
    """Validate an RFC 5321 Mailbox; ``allow_bare`` names local parts accepted without a domain."""
    if not _ascii_str(address):
        return _pure.check_mailbox(address, bad_address, allow_bare=allow_bare)
    if address.lower() in allow_bare:
        return address
    if not _mailbox(address):
        raise GrammarError(bad_address)
    return address


# -- ESMTP parameters ------------------------------------------------------------------------

cdef list _parse_params(object params):
    """parse_params for an ASCII ``params``."""
    cdef Py_ssize_t n, i = 0, start, eq, k
    cdef const char *s = PyUnicode_AsUTF8AndSize(params, &n)
    cdef list result = []
    cdef unsigned char keybuf[64]
    cdef Py_ssize_t j
    while True:
        while i < n and _is(s[i], SPACE):
            i += 1
        if i >= n:
            return result
        start = i
        eq = -1
        while i < n and not _is(s[i], SPACE):
            if eq < 0 and s[i] == b"=":
                eq = i
            i += 1
        k = (eq if eq >= 0 else i) - start  # the keyword's length
        if k == 0 or not _is(s[start], LETDIG):
            raise GrammarError(replies.unsupported_option(params[start:i]))
        for j in range(1, k):
            if not (_is(s[start + j], LETDIG) or s[start + j] == b"-"):
                raise GrammarError(replies.unsupported_option(params[start:i]))
        if k <= 64:
            for j in range(k):
                keybuf[j] = _upper(s[start + j])
            key = PyUnicode_DecodeASCII(<char *>keybuf, k, NULL)
        else:
            key = params[start : start + k].upper()
        result.append((key, params[eq + 1 : i] if eq >= 0 else None))


def parse_params(params):
    """ESMTP ``KEY=VALUE`` parameters (RFC 5321 §4.1.2 Mail-parameters). Repeats are kept:
    whether a keyword may repeat is the command's business."""
    if not _ascii_str(params):
        return _pure.parse_params(params)
    return _parse_params(params)


# -- MAIL and RCPT -----------------------------------------------------------------------------

def parse_mail_from(arg):
    """MAIL FROM:<reverse-path> [params]; ``<>`` is the null sender."""
    if not _ascii_str(arg):
        return _pure.parse_mail_from(arg)
    address, params = _parse_path(arg, "FROM:", replies.MAIL_SYNTAX)
    if address and not _mailbox(address):
        raise GrammarError(replies.BAD_SENDER)
    return address, _parse_params(params)


cdef bint _postmaster(object address):
    cdef Py_ssize_t n, i
    cdef const char *s = PyUnicode_AsUTF8AndSize(address, &n)
    cdef const char *want = b"postmaster"
    cdef int c
    if n != 10:
        return False
    for i in range(10):
        c = s[i]
        if 65 <= c <= 90:
            c += 32
        if c != want[i]:
            return False
    return True


def parse_rcpt_to(arg):
    """RCPT TO:<forward-path> [params]; ``<postmaster>`` needs no domain (RFC 5321 §4.1.1.3)."""
    if not _ascii_str(arg):
        return _pure.parse_rcpt_to(arg)
    address, params = _parse_path(arg, "TO:", replies.RCPT_SYNTAX)
    if not _postmaster(address) and not _mailbox(address):
        raise GrammarError(replies.BAD_RECIPIENT)
    return address, _parse_params(params)
