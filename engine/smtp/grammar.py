"""RFC 5321 command grammar: verbs, paths and ESMTP parameters as pure functions.

Trusts nothing: input is one client command line (bytes, without its line end). Returns parsed
values or raises GrammarError carrying the reply to send; no state, no I/O.
"""

import re

from engine.ipliteral import parse_address_literal
from engine.smtp import replies
from engine.smtp.replies import Reply


class GrammarError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def split_command(line: bytes) -> tuple[str, str]:
    """The verb (upper case) and the rest of the line. Non-ASCII bytes survive as surrogates."""
    text = line.decode("utf-8", "surrogateescape")
    verb, _, arg = text.strip(" ").partition(" ")
    return verb.upper(), arg.strip(" ")


# RFC 5321 §4.1.2:
#   Dot-string = Atom *("."  Atom);  Atom = 1*atext
#   Quoted-string = DQUOTE *QcontentSMTP DQUOTE
#   Domain = sub-domain *("." sub-domain);  address-literal = "[" ... "]"
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LOCAL_PART = rf"(?:{_DOT_STRING}|{_QUOTED})"
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*\.?"
_ADDRESS_LITERAL = r"\[[^\[\]]*\]"  # shape only; the address itself: engine.ipliteral
MAILBOX = re.compile(rf"({_LOCAL_PART})@({_DOMAIN}|{_ADDRESS_LITERAL})")
# A-d-l (source route, "@a,@b:") is accepted and ignored (RFC 5321 §4.1.2, Appendix C)
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PATH = re.compile(r"<([^<>]*)>(.*)")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def parse_path(arg: str, prefix: str, syntax: Reply) -> tuple[str, str]:
    """``FROM:<addr> params`` → (addr, params). Postfix tolerates a space after the colon."""
    if arg[: len(prefix)].upper() != prefix:
        raise GrammarError(syntax)
    match = _PATH.fullmatch(arg[len(prefix) :].lstrip(" "))
    if match is None:
        raise GrammarError(syntax)
    address, params = match.group(1), match.group(2)
    if params and not params.startswith(" "):
        raise GrammarError(syntax)
    route = _SOURCE_ROUTE.match(address)
    if route:
        address = address[route.end() :]
    if not address.isascii():
        raise GrammarError(replies.UNICODE_NOT_DECLARED)
    return address, params.strip(" ")


def check_mailbox(address: str, bad_address: Reply, *,
                  allow_bare: frozenset[str] = frozenset()) -> str:
    """Validate an RFC 5321 Mailbox; ``allow_bare`` names local parts accepted without a domain."""
    if address.lower() in allow_bare:
        return address
    match = MAILBOX.fullmatch(address)
    if match is None:
        raise GrammarError(bad_address)
    domain = match.group(2)
    if domain.startswith("[") and parse_address_literal(domain) is None:
        raise GrammarError(bad_address)
    return address


def parse_params(params: str) -> dict[str, str | None]:
    """ESMTP ``KEY=VALUE`` parameters (RFC 5321 §4.1.2 Mail-parameters), keys upper-cased."""
    result: dict[str, str | None] = {}
    for item in params.split():
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key):
            raise GrammarError(replies.unsupported_option(item))
        result[key.upper()] = value if eq else None
    return result


def parse_mail_from(arg: str) -> tuple[str, dict[str, str | None]]:
    """MAIL FROM:<reverse-path> [params]; ``<>`` is the null sender."""
    address, params = parse_path(arg, "FROM:", replies.MAIL_SYNTAX)
    if address:
        check_mailbox(address, replies.BAD_SENDER)
    return address, parse_params(params)


def parse_rcpt_to(arg: str) -> tuple[str, dict[str, str | None]]:
    """RCPT TO:<forward-path> [params]; ``<postmaster>`` needs no domain (RFC 5321 §4.1.1.3)."""
    address, params = parse_path(arg, "TO:", replies.RCPT_SYNTAX)
    check_mailbox(address, replies.BAD_RECIPIENT, allow_bare=frozenset({"postmaster"}))
    return address, parse_params(params)


def domain_of(address: str) -> str:
    """The domain after the last ``@``, lower-cased and without a trailing dot."""
    _, _, domain = address.rpartition("@")
    return domain.rstrip(".").lower()
