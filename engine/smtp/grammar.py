"""RFC 5321 command grammar: verbs, paths and ESMTP parameters (with RFC 3461 DSN values) as
pure functions.

Trusts nothing: input is one client command line (bytes, without its line end). Returns parsed
values or raises GrammarError carrying the reply to send (the DSN value checks return None and
leave the reply to the caller); no state, no I/O.
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
# RFC 6531 §3.3 (SMTPUTF8) extends the classes of a mailbox:
#   atext =/ UTF8-non-ascii;  qtextSMTP =/ UTF8-non-ascii;  sub-domain =/ U-label
# UTF8-non-ascii (RFC 6532 §3.1) is every code point past ASCII except the surrogates, which
# only stand for undecodable bytes here. Whether the client may send such an address (it
# declared SMTPUTF8) is the dialogue's business: the grammar only says what is well formed.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UTF8_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT_UTF8 = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8_NON_ASCII}-]"
_DOT_STRING = rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]|\\[\x20-\x7e])*"'
_LOCAL_PART = rf"(?:{_DOT_STRING}|{_QUOTED})"
_LET_DIG = f"A-Za-z0-9{_UTF8_NON_ASCII}"
_SUB_DOMAIN = rf"[{_LET_DIG}](?:[{_LET_DIG}-]*[{_LET_DIG}])?"
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


#: ESMTP parameters in the order given, keys upper-cased, values as given (None: no "=").
Params = list[tuple[str, str | None]]


def parse_params(params: str) -> Params:
    """ESMTP ``KEY=VALUE`` parameters (RFC 5321 §4.1.2 Mail-parameters). Repeats are kept:
    whether a keyword may repeat is the command's business."""
    result: Params = []
    for item in params.split():
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key):
            raise GrammarError(replies.unsupported_option(item))
        result.append((key.upper(), value if eq else None))
    return result


def parse_mail_from(arg: str) -> tuple[str, Params]:
    """MAIL FROM:<reverse-path> [params]; ``<>`` is the null sender."""
    address, params = parse_path(arg, "FROM:", replies.MAIL_SYNTAX)
    if address:
        check_mailbox(address, replies.BAD_SENDER)
    return address, parse_params(params)


def parse_rcpt_to(arg: str) -> tuple[str, Params]:
    """RCPT TO:<forward-path> [params]; ``<postmaster>`` needs no domain (RFC 5321 §4.1.1.3)."""
    address, params = parse_path(arg, "TO:", replies.RCPT_SYNTAX)
    check_mailbox(address, replies.BAD_RECIPIENT, allow_bare=frozenset({"postmaster"}))
    return address, parse_params(params)


# ---------------------------------------------------------------------------------------------
# RFC 3461 DSN parameters. Each function returns the value to keep (keywords upper-cased), or
# None when the value is malformed or missing; the caller picks the reply.

# RFC 3461 §4:
#   xtext   = *( xchar / hexchar )
#   xchar   = any ASCII CHAR between "!" (33) and "~" (126) inclusive, except for "+" and "=".
#   hexchar = ASCII "+" immediately followed by two upper case hexadecimal digits
_XCHAR = r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]"
_HEXCHAR = r"\+[0-9A-F]{2}"
_XTEXT = rf"(?:{_XCHAR}|{_HEXCHAR})*"
XTEXT = re.compile(_XTEXT)
_HEXCHAR_RE = re.compile(_HEXCHAR)


def xtext_decode(text: str) -> str:
    """The characters an xtext stands for (``+2B`` → ``+``); ``text`` must match XTEXT."""
    return _HEXCHAR_RE.sub(lambda hexchar: chr(int(hexchar[0][1:], 16)), text)


# RFC 3461 §4.3:
#   ret-value = "FULL" / "HDRS"
_RET_VALUES = frozenset({"FULL", "HDRS"})


def dsn_ret(value: str | None) -> str | None:
    """MAIL FROM ``RET=`` → ``FULL`` or ``HDRS``."""
    if value is None or value.upper() not in _RET_VALUES:
        return None
    return value.upper()


# RFC 3461 §4.4:
#   envid-parameter = "ENVID=" xtext
# "may be up to 100 characters in length"; it "MUST consist of printable (graphic or white
# space) characters from the US-ASCII repertoire". As Postfix: decoded, 1*(%d32-126).
ENVID_LENGTH_LIMIT = 100
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def dsn_envid(value: str | None) -> str | None:
    """MAIL FROM ``ENVID=`` → the xtext as given."""
    if value is None or len(value) > ENVID_LENGTH_LIMIT or not XTEXT.fullmatch(value):
        return None
    if not _PRINTABLE.fullmatch(xtext_decode(value)):
        return None
    return value


# RFC 3461 §4.1:
#   notify-esmtp-value  = "NEVER" / 1#notify-list-element
#   notify-list-element = "SUCCESS" / "FAILURE" / "DELAY"
# (no empty list elements accepted: senders write "SUCCESS,FAILURE")
_NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")  # the canonical order of the list we keep


def dsn_notify(value: str | None) -> str | None:
    """RCPT TO ``NOTIFY=`` → ``NEVER``, or a non-empty subset of SUCCESS,FAILURE,DELAY in that
    order (repeats folded)."""
    if not value:
        return None
    elements = set(value.upper().split(","))
    if elements == {"NEVER"}:
        return "NEVER"
    if not elements <= set(_NOTIFY_ORDER):
        return None  # an unknown or empty element, or NEVER with others
    return ",".join(element for element in _NOTIFY_ORDER if element in elements)


# RFC 3461 §4.2:
#   orcpt-parameter            = "ORCPT=" original-recipient-address
#   original-recipient-address = addr-type ";" xtext
#   addr-type                  = atom
# "The entire ORCPT parameter MAY be up to 500 characters in length" (here: its value).
ORCPT_LENGTH_LIMIT = 500
ORCPT = re.compile(rf"{_ATEXT}+;{_XTEXT}")
# RFC 6533 §3 (with SMTPUTF8 the original recipient may be a UTF-8 address):
#   utf-8-type-addr     = "utf-8;" utf-8-enc-addr
#   utf-8-addr-unitext  = 1*(QUCHAR / EmbeddedUnicodeChar)
#   QUCHAR              = QCHAR / UTF8-non-ascii
#   QCHAR               = %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e
#   EmbeddedUnicodeChar = %x5C.78 "{" HEXPOINT "}"
# (its ASCII-only forms are xtext already). Whether UTF-8 may be sent at all: the dialogue's.
ORCPT_UTF8 = re.compile(
    rf"(?i:utf-8);(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]"
    r"|\\x\{[0-9A-F]{2,6}\})+")


def dsn_orcpt(value: str | None) -> str | None:
    """RCPT TO ``ORCPT=`` → ``addr-type;xtext`` (or RFC 6533 ``utf-8;`` unitext) as given."""
    if value is None or len(value) > ORCPT_LENGTH_LIMIT:
        return None
    if not (ORCPT.fullmatch(value) or ORCPT_UTF8.fullmatch(value)):
        return None
    return value


def domain_of(address: str) -> str:
    """The domain after the last ``@``, lower-cased and without a trailing dot."""
    _, _, domain = address.rpartition("@")
    return domain.rstrip(".").lower()
