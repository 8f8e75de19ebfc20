"""IP addresses as mail writes them: one parser for the SMTP grammar, routing, config and DNS.

RFC 5321 §4.1.3 address literals are ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]``; Postfix next
hops and listeners also write ``[2001:db8::1]``. Pure functions; input may come from clients.
"""

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """A bare address, ``[address]`` or ``[IPv6:address]`` → the address; anything else → None."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        if "." in inner and ":" not in inner:
            return None
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        return None


def parse_address_literal(text: str) -> IPAddress | None:
    """Strict RFC 5321 address literal: ``[IPv4]`` or ``[IPv6:IPv6]``, else None."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        address = parse_ip(inner)
        return address if address is not None and address.version == 6 else None
    address = parse_ip(inner)
    return address if address is not None and address.version == 4 else None
