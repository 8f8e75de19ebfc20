"""SASL PLAIN (RFC 4616) and LOGIN exchanges, sans-I/O: responses in, the next step out.

An exchange turns the AUTH command's initial response and the client's answers to ``334``
challenges into credentials (user name and password) or a refusal; checking the password is
the application's job. Trusts nothing from the client: every response is base64-checked,
and the password is kept out of ``repr`` so it cannot slip into a log line.
"""

import binascii
from dataclasses import dataclass, field

from engine.smtp import replies
from engine.smtp.replies import Reply

MECHANISMS = ("PLAIN", "LOGIN")  # as EHLO advertises them


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 text`` and wait for the client's next line."""

    text: str  # base64


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete: check these."""

    username: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The exchange failed before any password was checked."""

    reply: Reply
    reason: str  # for the log line: never client data


Step = Challenge | Credentials | Refusal

ABORTED = Refusal(replies.AUTH_ABORTED, "aborted")
CANNOT_DECODE = Refusal(replies.AUTH_CANNOT_DECODE, "cannot decode response")
BAD_MESSAGE = Refusal(replies.AUTH_FAILED, "invalid authentication data")
AUTHZID_REFUSED = Refusal(replies.AUTH_FAILED, "authorization identity not allowed")


def _decode(text: str) -> bytes | None:
    """RFC 4954 §4: base64, where a lone ``=`` is an empty response. None if malformed."""
    if text == "=":
        return b""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Exchange:
    """One mechanism's dialogue. ``start`` takes the AUTH command's initial response (None
    when there was none), ``respond`` each later line; ``*`` from the client aborts."""

    name = ""

    def start(self, initial: str | None) -> Step:
        raise NotImplementedError

    def respond(self, line: str) -> Step:
        if line == "*":
            return ABORTED
        data = _decode(line)
        return CANNOT_DECODE if data is None else self._receive(data)

    def _receive(self, data: bytes) -> Step:
        raise NotImplementedError


class Plain(Exchange):
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``. As Dovecot, the authorization
    identity must be empty or the user's own name (no master users)."""

    name = "PLAIN"

    def start(self, initial: str | None) -> Step:
        return Challenge("") if initial is None else self.respond(initial)

    def _receive(self, data: bytes) -> Step:
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return BAD_MESSAGE
        authzid, username = _utf8(parts[0]), _utf8(parts[1])
        if authzid is None or username is None:
            return BAD_MESSAGE
        if authzid and authzid.lower() != username.lower():
            return AUTHZID_REFUSED
        return Credentials(username, parts[2])


USERNAME_CHALLENGE = "VXNlcm5hbWU6"  # base64 "Username:"
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # base64 "Password:"


class Login(Exchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password, each after
    its own challenge. An initial response, as many clients send, is the user name."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: str | None) -> Step:
        return Challenge(USERNAME_CHALLENGE) if initial is None else self.respond(initial)

    def _receive(self, data: bytes) -> Step:
        if self._username is None:
            username = _utf8(data)
            if not username or "\0" in username:
                return BAD_MESSAGE
            self._username = username
            return Challenge(PASSWORD_CHALLENGE)
        if not data:
            return BAD_MESSAGE
        return Credentials(self._username, data)


_EXCHANGES: dict[str, type[Exchange]] = {"PLAIN": Plain, "LOGIN": Login}


def begin(mechanism: str) -> Exchange | None:
    """A new exchange for the mechanism the client named (any case), None if unknown."""
    exchange = _EXCHANGES.get(mechanism.upper())
    return exchange() if exchange is not None else None
