"""The attribute lists of XCLIENT and XFORWARD (Postfix's XCLIENT_README and XFORWARD_README).

``XCLIENT NAME=mail.example ADDR=192.0.2.7`` and ``XFORWARD NAME=… IDENT=…`` carry
``name=xtext`` pairs (RFC 3461 xtext). ``parse_attributes`` decodes and checks them and returns
{NAME: value}, with None for ``[UNAVAILABLE]`` / ``[TEMPUNAVAIL]``, or the 501 reply Postfix
gives. Pure. The values come from a client the administrator authorized, but they still end up
in logs and Received: headers, so nothing that could break a header line or a log line passes.
"""

import ipaddress
import re

from engine.config.values import _is_hostname
from engine.smtp import replies
from engine.smtp.grammar import XTEXT, xtext_decode
from engine.smtp.replies import Reply

#: What the EHLO reply lists after the keyword, in Postfix's order.
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "REVERSE_NAME", "PORT", "LOGIN",
                      "DESTADDR", "DESTPORT")
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "SOURCE", "PORT", "IDENT")
#: XFORWARD attributes describing the up-stream client (Postfix's XFORWARD_CLIENT_MASK): once
#: one is forwarded, none of the current session's client attributes is used (no mixing).
XFORWARD_CLIENT_ATTRIBUTES = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO"})

VALUE_LENGTH_LIMIT = 255  # XFORWARD_README note 1; XCLIENT_README note 1
_UNAVAILABLE = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})  # any case (README note 2/3)
# After decoding: no control or non-ASCII characters, no white space, nothing that would end
# a "(name [addr])" comment or a log field early (XFORWARD_README note 1).
_SAFE = re.compile(r'[\x21-\x7e]+')
_HEADER_SPECIAL = frozenset('()<>[]\\"')
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


def _address(value: str) -> str | None:
    """IPv4 dotted quad, or ``IPv6:`` (any case) and an IPv6 address; the bare form kept."""
    if value[:5].lower() == "ipv6:":
        text, version = value[5:], 6
    else:
        text, version = value, 4
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version != version or "%" in text:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _port(value: str) -> str | None:
    return value if _PORT.fullmatch(value) and int(value) <= 65535 else None


def _hostname(value: str) -> str | None:
    return value.lower() if _is_hostname(value) else None


def _keyword(*allowed: str):
    def check(value: str) -> str | None:
        return value.upper() if value.upper() in allowed else None
    return check


def _text(value: str) -> str | None:
    return value


# Replaced, not refused (as Postfix's neuter(), so an up-stream MTA's delivery does not fail
# over a name it accepted): ";" and "@" (Postfix's) would start a Received: date or read as an
# address; "," and "=" would make a field of their own in the "client=…, orig_queue_id=…"
# log line.
_NEUTER = str.maketrans(dict.fromkeys(";@,=", "?"))


def _neutered(value: str) -> str | None:
    return value.translate(_NEUTER)


_XCLIENT_CHECKS = {
    "NAME": _hostname, "REVERSE_NAME": _hostname, "HELO": _neutered, "LOGIN": _text,
    "ADDR": _address, "DESTADDR": _address, "PORT": _port, "DESTPORT": _port,
    "PROTO": _keyword("SMTP", "ESMTP"),
}
_XFORWARD_CHECKS = {  # NAME, HELO, IDENT, PROTO may be non-DNS, non-SMTP
    "NAME": _neutered, "HELO": _neutered, "IDENT": _neutered, "PROTO": _neutered,
    "ADDR": _address, "PORT": _port, "SOURCE": _keyword("LOCAL", "REMOTE"),
}


def printable(text: str) -> str:
    """Client text fit to echo in a reply or a log line: anything else becomes ``?``."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def parse_attributes(verb: str, arg: str) -> dict[str, str | None] | Reply:
    """``arg`` of an XCLIENT or XFORWARD command → {attribute: value or None}, or the 501."""
    checks = _XCLIENT_CHECKS if verb == "XCLIENT" else _XFORWARD_CHECKS
    found: dict[str, str | None] = {}
    for item in arg.split():
        name, equals, raw = item.partition("=")
        if not equals:
            return replies.ATTRIBUTE_EXPECTED
        name = name.upper()
        check = checks.get(name)
        if check is None:
            return replies.bad_attribute_name(verb, printable(name))
        if not XTEXT.fullmatch(raw):
            return replies.bad_attribute_value(name, printable(raw))
        value = xtext_decode(raw)
        if len(value) > VALUE_LENGTH_LIMIT:
            return replies.ATTRIBUTE_TOO_LONG
        if value.upper() in _UNAVAILABLE:
            found[name] = None
            continue
        checked = None
        if _SAFE.fullmatch(value) and not _HEADER_SPECIAL.intersection(value):
            checked = check(value)
        if checked is None:
            return replies.bad_attribute_value(name, printable(value))
        found[name] = checked
    return found
