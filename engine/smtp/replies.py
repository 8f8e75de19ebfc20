"""SMTP replies: the value type and every fixed reply the server sends, in one table.

Texts and codes follow Postfix's smtpd so that administrators, log parsers and test suites that
know Postfix recognize them. Enhanced status codes (RFC 3463) lead every text.
"""

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. ``text`` may hold several lines separated by newlines (multi-line reply)."""

    code: int
    text: str

    def encode(self) -> bytes:
        lines = self.text.split("\n")
        last = len(lines) - 1
        return "".join(
            f"{self.code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)
        ).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(self.text.split("\n"))

    @property
    def flat(self) -> str:
        """The whole reply on one line, as Postfix logs it: "550-5.1.1 first 550 5.1.1 last"."""
        lines = self.lines
        last = len(lines) - 1
        return " ".join(
            f"{self.code}{' ' if i == last else '-'}{line}".rstrip() for i, line in enumerate(lines)
        )

    @property
    def dsn(self) -> str:
        """The enhanced status code from the text, else 2.0.0 / 4.0.0 / 5.0.0. Its class
        follows the reply code (RFC 3463 §3); a code outside 2xx/4xx/5xx counts as 4.x.x."""
        klass = str(self.code)[0] if self.code // 100 in (2, 4, 5) else "4"
        found = _ENHANCED.match(self.text)
        return f"{klass}.{found[2]}.{found[3]}" if found else f"{klass}.0.0"


OK = Reply(250, "2.0.0 Ok")
SENDER_OK = Reply(250, "2.1.0 Ok")
RECIPIENT_OK = Reply(250, "2.1.5 Ok")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0 Bye")
VRFY_NO_DISCLOSURE = Reply(
    252, "2.0.0 Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")

# 5.5.x: command syntax and sequence (RFC 5321 §4.2.4, Postfix smtpd wording)
BAD_SYNTAX = Reply(500, "5.5.2 Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2 Error: line too long")
NOT_RECOGNIZED = Reply(502, "5.5.2 Error: command not recognized")
SYNCHRONIZATION_ERROR = Reply(554, "5.5.0 Error: SMTP protocol synchronization")
NEED_MAIL = Reply(503, "5.5.1 Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1 Error: need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1 Error: nested MAIL command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1 Error: no valid recipients")
EHLO_SYNTAX = Reply(501, "5.5.4 Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4 Syntax: HELO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4 Syntax: RCPT TO:<address>")
VRFY_SYNTAX = Reply(501, "5.5.4 Syntax: VRFY address")
NO_ARGUMENTS = Reply(501, "5.5.4 Syntax: command takes no arguments")
BAD_SENDER = Reply(501, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3 Bad recipient address syntax")
BAD_BODY = Reply(501, "5.5.4 Bad BODY keyword value")
BAD_SIZE = Reply(501, "5.5.4 Bad SIZE keyword value")
# RFC 3461 DSN parameters: a malformed or repeated one (Postfix's wording, "Error:" on RCPT's)
BAD_RET = Reply(501, "5.5.4 Bad RET parameter syntax")
BAD_ENVID = Reply(501, "5.5.4 Bad ENVID parameter syntax")
BAD_NOTIFY = Reply(501, "5.5.4 Error: Bad NOTIFY parameter syntax")
BAD_ORCPT = Reply(501, "5.5.4 Error: Bad ORCPT parameter syntax")
NEED_HELO = Reply(503, "5.5.1 Error: send HELO/EHLO first")
UNICODE_NOT_DECLARED = Reply(553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
BAD_UTF8 = Reply(500, "5.5.2 Error: bad UTF-8 syntax")  # RFC 6531: a command not in UTF-8

# RFC 3030 BDAT (Postfix smtpd's replies). A malformed BDAT cannot be skipped (its byte count
# is unknown): 521 and hang up, as Postfix, rather than read message content as commands.
BDAT_SYNTAX = Reply(521, "5.5.4 Syntax: BDAT count [LAST]")
NULL_BDAT = Reply(551, "5.7.1 Null BDAT request")
DATA_AFTER_BDAT = Reply(503, "5.5.1 Error: DATA after BDAT")
MAIL_AFTER_BDAT = Reply(503, "5.5.1 Error: MAIL after BDAT")
RCPT_AFTER_BDAT = Reply(503, "5.5.1 Error: RCPT after BDAT")
CHUNK_TOO_BIG = Reply(552, "5.3.4 Chunk exceeds message size limit")
# XCLIENT / XFORWARD (Postfix's XCLIENT_README, XFORWARD_README and smtpd wording)
MAIL_IN_PROGRESS = Reply(503, "5.5.1 Error: MAIL transaction in progress")
INSUFFICIENT_AUTHORIZATION = Reply(550, "5.7.0 Error: insufficient authorization")
ATTRIBUTE_EXPECTED = Reply(501, "5.5.4 Error: attribute=value expected")
ATTRIBUTE_TOO_LONG = Reply(501, "5.5.4 Error: attribute value too long")

# STARTTLS (RFC 3207), Postfix's wording
READY_TO_START_TLS = Reply(220, "2.0.0 Ready to start TLS")
STARTTLS_SYNTAX = Reply(501, "5.5.4 Syntax: STARTTLS")
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1 Error: TLS already active")
NOT_IMPLEMENTED = Reply(502, "5.5.1 Error: command not implemented")
NEED_STARTTLS = Reply(530, "5.7.0 Must issue a STARTTLS command first")
TLS_UNAVAILABLE = Reply(454, "4.7.0 TLS not available due to local problem")

# AUTH (RFC 4954; Postfix smtpd's wording)
AUTH_OK = Reply(235, "2.7.0 Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8 Error: authentication failed: authentication failure")
AUTH_BAD_MECHANISM = Reply(
    535, "5.7.8 Error: authentication failed: Invalid authentication mechanism")
AUTH_ABORTED = Reply(501, "5.7.0 Authentication aborted")
AUTH_CANNOT_DECODE = Reply(501, "5.5.2 Cannot decode response")
AUTH_SYNTAX = Reply(501, "5.5.4 Syntax: AUTH mechanism")
AUTH_NOT_ENABLED = Reply(503, "5.5.1 Error: authentication not enabled")
AUTH_ALREADY = Reply(503, "5.5.1 Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1 Error: MAIL transaction in progress")
AUTH_NEEDS_TLS = Reply(504, "5.5.4 Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0 Authentication required")
AUTH_PARAMETER_DISABLED = Reply(503, "5.5.4 Error: authentication disabled")
AUTH_PARAMETER_TWICE = Reply(503, "5.5.4 Error: multiple AUTH= options")

# limits
TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed limit")
TOO_MANY_HOPS = Reply(554, "5.4.0 Error: too many hops")  # Postfix: cleanup's hopcount_limit
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Error: too many recipients")
SHUTTING_DOWN = Reply(421, "4.3.2 Service shutting down, closing transmission channel")
SPOOL_FULL = Reply(452, "4.3.1 Insufficient system storage")
SPOOL_ERROR = Reply(451, "4.3.0 Error: queue file write error")


def unsupported_option(name: str) -> Reply:
    return Reply(555, f"5.5.4 Unsupported option: {name}")


def attribute_syntax(verb: str) -> Reply:
    return Reply(501, f"5.5.4 Syntax: {verb} attribute=value...")


def bad_attribute_name(verb: str, name: str) -> Reply:
    return Reply(501, f"5.5.4 Bad {verb} attribute name: {name}")


def bad_attribute_value(name: str, value: str) -> Reply:
    return Reply(501, f"5.5.4 Bad {name} syntax: {value}")


def local_error(hostname: str) -> Reply:
    """Postfix's answer when it cannot tell who the client is (a bad PROXY header)."""
    return Reply(421, f"4.3.0 {hostname} Server local error")


def relay_denied(recipient: str) -> Reply:
    return Reply(554, f"5.7.1 <{recipient}>: Relay access denied")


def queued(queue_id: str, chunked_size: int | None = None) -> Reply:
    """The message is committed; after BDAT (``chunked_size``: the bytes of every chunk) Postfix
    also says how much it received."""
    if chunked_size is None:
        return Reply(250, f"2.0.0 Ok: queued as {queue_id}")
    return Reply(250, f"2.0.0 Ok: {chunked_size} bytes queued as {queue_id}")


def chunk_received(size: int) -> Reply:
    """A BDAT chunk other than the last is in (RFC 3030 §2)."""
    return Reply(250, f"2.0.0 Ok: {size} bytes")


def chunk_discarded(size: int) -> Reply:
    """A BDAT chunk of a transaction that already failed: read and dropped."""
    return Reply(551, f"5.0.0 Discarded {size} bytes after earlier error")


def too_many_auth_failures(hostname: str) -> Reply:
    return Reply(421, f"4.7.0 {hostname} Error: too many authentication failures")
