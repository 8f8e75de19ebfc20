"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), parsed without I/O.

A load balancer in front of Tern opens its own connection and, before any SMTP byte, sends one
header naming the real client. ``parse(data)`` looks at the bytes received so far and answers
"need more" (None), the header (``ProxyHeader``), or raises ``ProxyError`` with Postfix's reason
text (src/global/haproxy_srvr.c), so the adapter logs what Postfix logs. Trusts nothing: the
bytes come from the network, and a listener expecting the header believes it only because the
administrator put a proxy there. Never needs more than ``MAX_HEADER`` bytes: a caller that keeps
only that much can always decide.
"""

import ipaddress
import re
import struct
from dataclasses import dataclass

# §2.1: "PROXY" SP proto SP src SP dst SP sport SP dport CRLF, at most 107 bytes with CRLF.
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
# §2.2: 12-byte signature, version/command, family/transport, 16-bit length of what follows.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
MAX_HEADER = V2_FIXED_LENGTH + 0xFFFF  # the largest header either version can carry

_V2_COMMAND_LOCAL = 0x0
_V2_COMMAND_PROXY = 0x1
_V2_TCP4 = 0x11  # AF_INET, STREAM: 4+4+2+2 address bytes
_V2_TCP6 = 0x21  # AF_INET6, STREAM: 16+16+2+2
_V2_UNSPEC = 0x00
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")  # decimal, no leading zero (as Postfix checks)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy told us. ``client``/``server`` are (address, port) of the proxied TCP
    connection, or None when the header says the connection is not proxied (v2 LOCAL, v2 UNSPEC,
    v1 UNKNOWN): the socket's own endpoints are then the real ones (§2.1, §2.2)."""

    length: int  # bytes the header took; what follows is the client's first SMTP bytes
    version: int
    client: tuple[str, int] | None
    server: tuple[str, int] | None


class ProxyError(ValueError):
    """A header that is not valid PROXY protocol; ``str()`` is Postfix's reason text."""


def parse(data: bytes, *, final: bool = False) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes may complete it. ``final``:
    no more bytes will come (the client closed), so an incomplete header is an error."""
    if data.startswith(V1_PREFIX):
        return _parse_v1(data, final)
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data, final)
    if V1_PREFIX.startswith(data[:6]) or V2_SIGNATURE.startswith(data[:12]):
        if final:
            raise ProxyError("short protocol header")
        return None  # a prefix of one of the two signatures: wait for more
    raise ProxyError("unrecognized protocol header")


# -- version 1: one text line -------------------------------------------------------------------


def _parse_v1(data: bytes, final: bool) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if final or len(data) >= V1_MAX_LENGTH:
            raise ProxyError("missing protocol header terminator")
        return None
    fields = data[:end].split(b" ")
    length = end + 2
    if fields[1:2] == [b"UNKNOWN"]:  # §2.1: the rest of the line is to be ignored
        return ProxyHeader(length=length, version=1, client=None, server=None)
    if len(fields) < 2 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("bad or missing protocol type")
    version = 4 if fields[1] == b"TCP4" else 6
    fields += [b""] * (6 - len(fields))
    if len(fields) > 6:
        raise ProxyError("unexpected data after server port")
    client_ip = _v1_address(fields[2], version, "client")
    server_ip = _v1_address(fields[3], version, "server")
    client_port = _v1_port(fields[4], "client")
    server_port = _v1_port(fields[5], "server")
    return ProxyHeader(length=length, version=1, client=(client_ip, client_port),
                       server=(server_ip, server_port))


def _v1_address(text: bytes, version: int, which: str) -> str:
    if b"%" in text:  # an IPv6 scope id: any bytes but SP (even LF), straight into the logs
        raise ProxyError(f"bad or missing {which} address")
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"bad or missing {which} address") from None
    if address.version != version:
        raise ProxyError(f"bad or missing {which} address")
    return _printable(address)


def _v1_port(text: bytes, which: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyError(f"bad or missing {which} port")
    return int(text)


# -- version 2: binary --------------------------------------------------------------------------


def _parse_v2(data: bytes, final: bool) -> ProxyHeader | None:
    if len(data) < V2_FIXED_LENGTH:
        if final:
            raise ProxyError("short protocol header")
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyError("unrecognized protocol version")
    command = version_command & 0x0F
    if command not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        raise ProxyError("bad command in proxy header")
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        if final:
            raise ProxyError("short version 2 protocol header")
        return None
    # TLVs (§2.2.7) after the addresses are skipped: nothing here needs them.
    if command == _V2_COMMAND_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(length=total, version=2, client=None, server=None)
    block = data[V2_FIXED_LENGTH:total]
    if family == _V2_TCP4:
        if length < 12:
            raise ProxyError("short address field")
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
    elif family == _V2_TCP6:
        if length < 36:
            raise ProxyError("short address field")
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
    else:  # UDP, UNIX sockets: not an SMTP client
        raise ProxyError("unsupported network protocol")
    return ProxyHeader(length=total, version=2,
                       client=(_printable(ipaddress.ip_address(src)), sport),
                       server=(_printable(ipaddress.ip_address(dst)), dport))


def _printable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as logs and mynetworks see it: an IPv4-mapped IPv6 address as IPv4 (as
    Postfix converts it), everything else in canonical form."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)

