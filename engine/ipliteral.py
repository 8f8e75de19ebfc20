"""IP addresses as mail writes them: one parser for the SMTP grammar, routing, config and DNS.

RFC 5321 §4.1.3 address literals are ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]``; Postfix next
hops and listeners also write ``[2001:db8::1]``. Pure functions; input may come from clients.
"""

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str, version: int | None = None) -> IPAddress | None:
    """A plain address (no zone: RFC 5321 has none), optionally of one IP version."""
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address if version is None or address.version == version else None


def parse_ip(text: str) -> IPAddress | None:
    """A bare address, ``[address]`` or ``[IPv6:address]`` → the address; anything else → None."""
    if text.startswith("[") and text.endswith("]"):
        return parse_address_literal(text) or _address(text[1:-1])
    return _address(text)


def parse_address_literal(text: str) -> IPAddress | None:
    """Strict RFC 5321 address literal: ``[IPv4]`` or ``[IPv6:IPv6]``, else None."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return _address(inner[5:], 6)
    return _address(inner, 4)
