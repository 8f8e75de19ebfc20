"""The PROXY protocol parser (engine.smtpd.proxy): versions 1 and 2, fed whole, byte by byte and
with SMTP bytes after the header; and every way a header can be wrong, with Postfix's reasons."""

import ipaddress
import struct

import pytest

from engine.smtpd import proxy
from engine.smtpd.proxy import ProxyError, ProxyHeader

SIG = proxy.V2_SIGNATURE


def v1(client, server, family=None) -> bytes:
    family = family or ("TCP6" if ":" in client[0] else "TCP4")
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()


def v2(client=None, server=None, *, command=0x1, family=None, tlvs=b"", version=2) -> bytes:
    """A version 2 header: PROXY with TCP4/TCP6 endpoints, or LOCAL/UNSPEC when client is None."""
    block = b""
    if client is not None:
        src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
        family = family if family is not None else (0x11 if src.version == 4 else 0x21)
        block = src.packed + dst.packed + struct.pack("!HH", client[1], server[1])
    block += tlvs
    return SIG + struct.pack("!BBH", version << 4 | command, family or 0, len(block)) + block


def feed_bytewise(data: bytes):
    """Parse as the adapter does: a growing bytearray, until a result (None before that)."""
    for end in range(1, len(data) + 1):
        result = proxy.parse(bytearray(data[:end]))
        if result is not None:
            return result, end
    return None, len(data)


V1_CASES = [
    (v1(("192.0.2.7", 40000), ("198.51.100.1", 25)),
     ("192.0.2.7", 40000), ("198.51.100.1", 25)),
    (v1(("2001:db8::7", 1), ("2001:db8::1", 25)), ("2001:db8::7", 1), ("2001:db8::1", 25)),
    (v1(("2001:DB8:0:0::7", 65535), ("::1", 0)), ("2001:db8::7", 65535), ("::1", 0)),
    # an IPv4-mapped address is the IPv4 client it stands for (mynetworks, logs)
    (v1(("::ffff:192.0.2.9", 5), ("::ffff:127.0.0.1", 25)), ("192.0.2.9", 5), ("127.0.0.1", 25)),
]


@pytest.mark.parametrize("header, client, server", V1_CASES)
def test_v1_tcp_header_gives_both_endpoints(header, client, server):
    parsed = proxy.parse(header + b"EHLO x\r\n")
    assert parsed == ProxyHeader(length=len(header), version=1, client=client, server=server)


@pytest.mark.parametrize("header, client, server", V1_CASES)
def test_v1_is_decided_only_at_its_line_end(header, client, server):
    result, used = feed_bytewise(header)
    assert used == len(header)
    assert result.client == client


def test_v1_unknown_means_use_the_socket_endpoints():
    for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert proxy.parse(header + b"QUIT\r\n") == ProxyHeader(len(header), 1, None, None)


def test_v1_longest_header_fits_and_one_more_byte_does_not():
    longest = v1(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                 ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))
    assert len(longest) == 104  # the spec's worst case; 107 is the limit with slack
    assert proxy.parse(longest).client[1] == 65535
    padded = b"PROXY UNKNOWN " + b"x" * (proxy.V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(padded) == proxy.V1_MAX_LENGTH
    assert proxy.parse(padded).length == proxy.V1_MAX_LENGTH
    with pytest.raises(ProxyError, match="missing protocol header terminator"):
        proxy.parse(b"PROXY UNKNOWN " + b"x" * (proxy.V1_MAX_LENGTH - 15) + b"\r\n")


@pytest.mark.parametrize("line, reason", [
    (b"PROXY TCP5 1.2.3.4 4.3.2.1 1 2", "bad or missing protocol type"),
    (b"PROXY", "unrecognized protocol header"),  # not "PROXY ": neither version
    (b"PROXY  TCP4 1.2.3.4 4.3.2.1 1 2", "bad or missing protocol type"),
    (b"PROXY TCP4", "bad or missing client address"),
    (b"PROXY TCP4 1.2.3", "bad or missing client address"),
    (b"PROXY TCP4 2001:db8::1 4.3.2.1 1 2", "bad or missing client address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2", "bad or missing client address"),
    (b"PROXY TCP4 1.2.3.4", "bad or missing server address"),
    (b"PROXY TCP6 ::1 4.3.2.1 1 2", "bad or missing server address"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1", "bad or missing client port"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1 0123 25", "bad or missing client port"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1 65536 25", "bad or missing client port"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1 -1 25", "bad or missing client port"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1 1", "bad or missing server port"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1 1 x", "bad or missing server port"),
    (b"PROXY TCP4 1.2.3.4 4.3.2.1 1 2 3", "unexpected data after server port"),
    (b"PROXY TCP4 1.2.3.\xff 4.3.2.1 1 2", "bad or missing client address"),
    # IPv6 scope ids: Python's ipaddress takes any text after "%" (a LF forges log lines)
    (b"PROXY TCP6 fe80::1%\nX-Injected:evil 2001:db8::1 1 25", "bad or missing client address"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 25", "bad or missing client address"),
    (b"PROXY TCP6 2001:db8::7 fe80::1%1 1 25", "bad or missing server address"),
])
def test_v1_malformed_lines_are_refused_with_postfix_reasons(line, reason):
    with pytest.raises(ProxyError) as refused:
        proxy.parse(line + b"\r\n")
    assert str(refused.value) == reason


def test_v1_without_line_end_waits_then_fails_at_the_limit_or_at_eof():
    partial = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000"
    assert proxy.parse(partial) is None
    with pytest.raises(ProxyError, match="missing protocol header terminator"):
        proxy.parse(partial, final=True)
    with pytest.raises(ProxyError, match="missing protocol header terminator"):
        proxy.parse(b"PROXY " + b"1" * 200)  # never more than 107 bytes looked for


def test_v1_bare_lf_is_not_a_line_end():
    with pytest.raises(ProxyError, match="missing protocol header terminator"):
        proxy.parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n" + b"x" * 100)


# -- version 2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("client, server, expected", [
    (("192.0.2.7", 40000), ("198.51.100.1", 25), (("192.0.2.7", 40000), ("198.51.100.1", 25))),
    (("2001:db8::7", 1), ("2001:db8::1", 587), (("2001:db8::7", 1), ("2001:db8::1", 587))),
    (("::ffff:192.0.2.9", 5), ("::ffff:127.0.0.1", 25), (("192.0.2.9", 5), ("127.0.0.1", 25))),
    # 16 binary bytes have no room for a scope id: a link-local address comes out bare
    (("fe80::1", 7), ("2001:db8::1", 25), (("fe80::1", 7), ("2001:db8::1", 25))),
])
def test_v2_proxy_command_gives_both_endpoints(client, server, expected):
    header = v2(client, server)
    parsed = proxy.parse(header + b"EHLO x\r\n")
    assert parsed.length == len(header) and parsed.version == 2
    assert (parsed.client, parsed.server) == expected
    result, used = feed_bytewise(header)
    assert (result, used) == (parsed, len(header))


def test_v2_tlvs_are_skipped_and_counted_in_the_length():
    tlvs = b"\x01\x00\x04smtp" + b"\x05\x00\x08uniqueid" + b"\x20\x00\x05\x01\x00\x00\x00\x00"
    header = v2(("192.0.2.7", 40000), ("198.51.100.1", 25), tlvs=tlvs)
    parsed = proxy.parse(header + b"QUIT\r\n")
    assert parsed.length == len(header) == 16 + 12 + len(tlvs)
    assert parsed.client == ("192.0.2.7", 40000)


def test_v2_local_command_means_use_the_socket_endpoints():
    header = v2(command=0x0)  # HAProxy's health checks
    assert proxy.parse(header) == ProxyHeader(16, 2, None, None)
    # LOCAL may carry addresses and TLVs: skipped, still not proxied
    header = v2(("192.0.2.7", 1), ("198.51.100.1", 25), command=0x0, tlvs=b"\x04\x00\x00")
    assert proxy.parse(header + b"x") == ProxyHeader(len(header), 2, None, None)


def test_v2_unspec_family_means_use_the_socket_endpoints():
    header = v2(command=0x1, family=0x00, tlvs=b"\x04\x00\x00")
    assert proxy.parse(header) == ProxyHeader(len(header), 2, None, None)


@pytest.mark.parametrize("header, reason", [
    (v2(("192.0.2.7", 1), ("198.51.100.1", 25), version=1), "unrecognized protocol version"),
    (v2(("192.0.2.7", 1), ("198.51.100.1", 25), version=3), "unrecognized protocol version"),
    (v2(("192.0.2.7", 1), ("198.51.100.1", 25), command=0x2), "bad command in proxy header"),
    (v2(("192.0.2.7", 1), ("198.51.100.1", 25), family=0x12), "unsupported network protocol"),
    (v2(("192.0.2.7", 1), ("198.51.100.1", 25), family=0x31), "unsupported network protocol"),
    (SIG + b"\x21\x11\x00\x08" + bytes(8), "short address field"),
    (SIG + b"\x21\x21\x00\x0c" + bytes(12), "short address field"),
])
def test_v2_malformed_headers_are_refused_with_postfix_reasons(header, reason):
    with pytest.raises(ProxyError) as refused:
        proxy.parse(header)
    assert str(refused.value) == reason


def test_v2_truncated_header_waits_then_fails_at_eof():
    header = v2(("192.0.2.7", 40000), ("198.51.100.1", 25))
    for cut in (5, 12, 15):
        assert proxy.parse(header[:cut]) is None
        with pytest.raises(ProxyError, match="short protocol header"):
            proxy.parse(header[:cut], final=True)
    assert proxy.parse(header[:20]) is None
    with pytest.raises(ProxyError, match="short version 2 protocol header"):
        proxy.parse(header[:20], final=True)


def test_v2_declared_length_bounds_what_is_waited_for():
    """A peer declaring the largest length is waited for, never more than MAX_HEADER bytes."""
    header = SIG + b"\x21\x11\xff\xff"
    body = b"\x7f\x00\x00\x02\x7f\x00\x00\x01\x00\x19\x00\x19"
    data = header + body + bytes(0xFFFF - len(body))
    assert proxy.parse(data[:-1]) is None
    assert len(data) == proxy.MAX_HEADER
    assert proxy.parse(data).length == proxy.MAX_HEADER


@pytest.mark.parametrize("data", [
    b"EHLO client.example\r\n", b"GET / HTTP/1.0\r\n", b"\x16\x03\x01\x02\x00", b"P",
    b"PROXX TCP4", b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8), b"\x00" * 16, b"proxy TCP4 ",
])
def test_anything_else_is_refused_at_once(data):
    if data == b"P":  # could still become "PROXY ": wait
        assert proxy.parse(data) is None
        with pytest.raises(ProxyError, match="short protocol header"):
            proxy.parse(data, final=True)
        return
    with pytest.raises(ProxyError, match="unrecognized protocol header"):
        proxy.parse(data)


def test_nothing_at_all_is_short_at_eof():
    assert proxy.parse(b"") is None
    with pytest.raises(ProxyError, match="short protocol header"):
        proxy.parse(b"", final=True)
