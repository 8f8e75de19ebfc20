"""nexthop_for: transport_maps, then relayhost, then MX (a pure function)."""

import pytest

from engine.config import Config
from engine.delivery import NextHop
from engine.delivery.route import nexthop_for, transport_lookup

MAPS = {
    "example.com": "smtp:[mail.example.com]",
    ".example.com": "smtp:relay.example.net:2525",
    ".sub.example.com": "lmtp:[127.0.0.1]:24",
    "local.test": "lmtp:[::1]",
    "plain.test": "smtp:",
    "*": "smtp:[fallback.example.net]:587",
}


def test_mx_delivery_to_the_domain_by_default():
    assert nexthop_for("Example.ORG.", Config()) == NextHop("smtp", "example.org", 25, True)


def test_address_literal_domain_skips_mx():
    assert nexthop_for("[192.0.2.1]", Config()) == NextHop("smtp", "192.0.2.1", 25, False)


@pytest.mark.parametrize(
    ("relayhost", "hop"),
    [
        ("[relay.example.net]", NextHop("smtp", "relay.example.net", 25, False)),
        ("[relay.example.net]:587", NextHop("smtp", "relay.example.net", 587, False)),
        ("relay.example.net", NextHop("smtp", "relay.example.net", 25, True)),
        ("[127.0.0.1]:2525", NextHop("smtp", "127.0.0.1", 2525, False)),
    ],
)
def test_relayhost(relayhost, hop):
    assert nexthop_for("example.org", Config(relayhost=relayhost)) == hop


@pytest.mark.parametrize(
    ("domain", "hop"),
    [
        ("example.com", NextHop("smtp", "mail.example.com", 25, False)),  # exact beats .parent
        ("a.example.com", NextHop("smtp", "relay.example.net", 2525, True)),
        ("x.sub.example.com", NextHop("lmtp", "127.0.0.1", 24, False)),  # nearest parent
        ("sub.example.com", NextHop("smtp", "relay.example.net", 2525, True)),  # .sub: subs only
        ("local.test", NextHop("lmtp", "::1", 24, False)),  # lmtp's default port
        ("plain.test", NextHop("smtp", "plain.test", 25, True)),  # empty next hop: the domain
        ("other.org", NextHop("smtp", "fallback.example.net", 587, False)),  # "*"
    ],
)
def test_transport_maps(domain, hop):
    assert nexthop_for(domain, Config(transport_maps=MAPS)) == hop


def test_transport_maps_come_before_relayhost():
    config = Config(
        transport_maps={"example.com": "smtp:[direct.example.com]"}, relayhost="[relay.example.net]"
    )
    assert nexthop_for("example.com", config).host == "direct.example.com"
    assert nexthop_for("example.org", config).host == "relay.example.net"


def test_transport_lookup_without_match():
    assert transport_lookup("example.org", {"example.com": "smtp:"}) is None
