"""engine.ipliteral: the one IP-literal parser (pure functions, no I/O)."""

import ipaddress

import pytest

from engine.ipliteral import parse_address_literal, parse_ip

v4 = ipaddress.IPv4Address
v6 = ipaddress.IPv6Address


@pytest.mark.parametrize(
    "text, expected",
    [
        ("192.0.2.1", v4("192.0.2.1")),
        ("[192.0.2.1]", v4("192.0.2.1")),
        ("2001:db8::1", v6("2001:db8::1")),
        ("[2001:DB8::1]", v6("2001:db8::1")),
        ("[IPv6:2001:db8::1]", v6("2001:db8::1")),
        ("[ipv6:2001:db8::1]", v6("2001:db8::1")),  # ABNF strings ignore case
        ("[IPV6:::1]", v6("::1")),
        ("[::1]", v6("::1")),
        ("[IPv6:::ffff:192.0.2.1]", v6("::ffff:192.0.2.1")),  # IPv6v4-full/comp
    ],
)
def test_parse_ip_accepts_bare_and_bracketed_forms(text, expected):
    assert parse_ip(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "[]", "[", "]", "[192.0.2.1", "192.0.2.1]", "[1.2.3]", "1.2.3", "127.1", "0x7f.0.0.1",
     "192.0.2.01", "256.0.0.1", "[IPv6:1.2.3.4]", "[IPv6:]", "[IPv6:1::2::3]", "[IPv6: ::1]",
     " 192.0.2.1", "[192.0.2.1] ", "[[::1]]", "example.com", "[example.com]", "[IPv4:1.2.3.4]",
     "[tag:content]", "192.0.2.1:25", "[192.0.2.1]:25"],
)  # fmt: skip
def test_parse_ip_rejects_junk(text):
    assert parse_ip(text) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[192.0.2.1]", v4("192.0.2.1")),
        ("[IPv6:2001:db8::1]", v6("2001:db8::1")),
        ("[ipv6:2001:DB8::1]", v6("2001:db8::1")),
        ("[IPv6:::1]", v6("::1")),
        ("[IPv6:::ffff:192.0.2.1]", v6("::ffff:192.0.2.1")),
    ],
)
def test_parse_address_literal_accepts_rfc5321_forms(text, expected):
    assert parse_address_literal(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[::1]",  # lenient form: an IPv6 literal needs its "IPv6:" tag (RFC 5321 §4.1.3)
        "[2001:db8::1]",
        "[IPv6:1.2.3.4]",  # the tag says IPv6, the address is IPv4
        "[1.2.3]",
        "192.0.2.1",  # bare: no brackets
        "2001:db8::1",
        "IPv6:2001:db8::1",
        "[]",
        "[IPv6:]",
        "[192.0.2.1",
        "[example.com]",
        "[192.0.2.1]:25",
    ],
)
def test_parse_address_literal_is_strict(text):
    assert parse_address_literal(text) is None


def test_strict_and_lenient_differ_only_in_forms():
    assert parse_ip("[::1]") == v6("::1")
    assert parse_address_literal("[::1]") is None
    assert parse_ip("[IPv6:::1]") == parse_address_literal("[IPv6:::1]") == v6("::1")
    assert parse_ip("[1.2.3]") is None and parse_address_literal("[1.2.3]") is None
    assert parse_ip("[IPv6:1.2.3.4]") is None and parse_address_literal("[IPv6:1.2.3.4]") is None


def test_address_literal_has_no_ipv6_zone():
    assert parse_address_literal("[IPv6:fe80::1%eth0]") is None


def test_parse_ip_tag_needs_brackets():
    assert parse_ip("IPv6:::1") is None
