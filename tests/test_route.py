"""nexthop_for: transport_maps, then local domains, then relayhost, then MX (a pure function)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config import Config
from engine.delivery import NextHop, PermanentFailure, TransientFailure
from engine.delivery.route import nexthop_for, transport_lookup
from engine.ipliteral import parse_ip
from engine.smtp import replies
from engine.smtp.grammar import GrammarError, check_mailbox, domain_of

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


@pytest.mark.parametrize(
    ("domain", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:2001:DB8:0::1]", "2001:db8::1"),
        ("[IPv6:::ffff:192.0.2.1]", "::ffff:c000:201"),
    ],
)
def test_address_literal_domain_goes_to_that_address_without_mx(domain, address):
    assert nexthop_for(domain, Config()) == NextHop("smtp", address, 25, False)


@pytest.mark.parametrize(
    ("entry", "hop"),
    [
        ("smtp:", NextHop("smtp", "192.0.2.1", 25, False)),  # empty next hop: the literal
        ("lmtp:", NextHop("lmtp", "192.0.2.1", 24, False)),
        ("smtp:[relay.example.net]", NextHop("smtp", "relay.example.net", 25, False)),
    ],
)
def test_address_literal_domain_through_transport_maps(entry, hop):
    assert nexthop_for("[192.0.2.1]", Config(transport_maps={"*": entry})) == hop


def test_address_literal_domain_follows_relayhost():
    config = Config(relayhost="[relay.example.net]:587")
    assert nexthop_for("[192.0.2.1]", config) == NextHop("smtp", "relay.example.net", 587, False)


@pytest.mark.parametrize("domain", ["[1.2.3]", "[IPv6:192.0.2.1]", "[]", "[mail.example]", ""])
def test_unroutable_domain_is_a_permanent_failure(domain):
    with pytest.raises(PermanentFailure) as info:
        nexthop_for(domain, Config())
    assert info.value.dsn == "5.1.2"


def test_local_domains_go_to_the_local_transport_not_the_relayhost():
    config = Config(
        myhostname="mx.example.test",
        mydestination=("$myhostname", "localhost", "$mydomain"),
        relayhost="[relay.example.net]",
    )
    for domain in ("mx.example.test", "MX.Example.Test.", "localhost", "example.test"):
        assert nexthop_for(domain, config) == NextHop(
            transport="local", host=domain.rstrip(".").lower(), mx_lookup=False
        )
    assert nexthop_for("other.example.test", config).transport == "smtp"


def test_transport_maps_override_local_domains_as_in_postfix():
    config = Config(myhostname="mx.example.test", transport_maps={
        "localhost": "lmtp:[127.0.0.1]:24", "*": "smtp:[relay.example.net]"})
    assert nexthop_for("localhost", config) == NextHop("lmtp", "127.0.0.1", 24, False)
    assert nexthop_for("mx.example.test", config) == NextHop("smtp", "relay.example.net", 25,
                                                             False)


_LABEL = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
GRAMMAR_DOMAINS = st.one_of(
    st.lists(_LABEL, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"),
    st.from_regex(r"\[[0-9A-Fa-f:.IPVipv]{0,30}\]", fullmatch=True),
)
BY_DOMAIN = [Config(), Config(transport_maps={"*": "smtp:"})]  # the next hop is the domain
ELSEWHERE = [Config(transport_maps=MAPS), Config(relayhost="[relay.example.net]")]


@given(GRAMMAR_DOMAINS)
def test_never_raises_for_a_domain_the_grammar_accepts(domain):
    address = f"user@{domain}"
    try:
        check_mailbox(address, replies.BAD_RECIPIENT)
    except GrammarError:
        return
    for config in BY_DOMAIN:
        hop = nexthop_for(domain_of(address), config)
        if domain.startswith("["):
            assert hop == NextHop("smtp", str(parse_ip(domain)), 25, False)
        else:
            assert hop == NextHop("smtp", domain.lower(), 25, True)
    for config in ELSEWHERE:
        assert isinstance(nexthop_for(domain_of(address), config), NextHop)


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


def test_address_literal_has_no_parent_domains():
    assert transport_lookup("[192.0.2.1]", {".1]": "smtp:[x.example]"}) is None


def test_sender_dependent_default_transport_picks_the_pool():
    config = Config(
        mydestination=("local.test",),
        relayhost="[relay.test]",
        transport_maps={"dest.test": "out3:"},
        transport={"out2": {}, "out3": {}, "out4": {}},  # SMTP transports of their own
        sender_dependent_default_transport_maps={
            "@x.test": "out2:",
            "boss@x.test": "out4:[boss-relay.test]:2525",
        },
    )
    assert nexthop_for("y.test", config, "a@X.test") == NextHop("out2", "relay.test", 25, False)
    assert nexthop_for("y.test", config, "boss@x.test") == NextHop(
        "out4", "boss-relay.test", 2525, False)
    assert nexthop_for("y.test", config, "a@other.test") == NextHop(
        "smtp", "relay.test", 25, False)
    assert nexthop_for("y.test", config, "") == NextHop("smtp", "relay.test", 25, False)
    # transport_maps and local domains come first, as in Postfix
    assert nexthop_for("dest.test", config, "a@x.test") == NextHop("out3", "dest.test", 25, True)
    assert nexthop_for("local.test", config, "a@x.test").transport == "local"
    no_relayhost = Config(sender_dependent_default_transport_maps={"@x.test": "out2:"},
                          transport={"out2": {}})
    assert nexthop_for("y.test", no_relayhost, "a@x.test") == NextHop("out2", "y.test", 25, True)


def test_sender_dependent_relayhost_overrides_relayhost_for_its_senders():
    config = Config(
        mydestination=("local.test",),
        relayhost="[relay.test]",
        transport_maps={"dest.test": "smtp:[dest-relay.test]"},
        transport={"out2": {}},
        sender_dependent_default_transport_maps={"@pool.test": "out2:"},
        sender_dependent_relayhost_maps={
            "@x.test": "[x-relay.test]:587",
            "boss@x.test": "boss-relay.test",  # the address before its domain
            "@pool.test": "[pool-relay.test]",
            "<>": "[bounce-relay.test]:2525",
        },
    )
    assert nexthop_for("y.test", config, "a@X.test") == NextHop("smtp", "x-relay.test", 587, False)
    assert nexthop_for("y.test", config, "Boss@x.test") == NextHop(
        "smtp", "boss-relay.test", 25, True)
    assert nexthop_for("y.test", config, "a@other.test") == NextHop(
        "smtp", "relay.test", 25, False)
    # the null sender is looked up as empty_address_relayhost_maps_lookup_key
    assert nexthop_for("y.test", config, "") == NextHop("smtp", "bounce-relay.test", 2525, False)
    # a sender-dependent transport without its own next hop takes the sender's relay host
    assert nexthop_for("y.test", config, "a@pool.test") == NextHop(
        "out2", "pool-relay.test", 25, False)
    # transport_maps and local domains come first, as in Postfix
    assert nexthop_for("dest.test", config, "a@x.test").host == "dest-relay.test"
    assert nexthop_for("local.test", config, "a@x.test").transport == "local"
    # without relayhost: the sender's relay host, else MX
    no_relayhost = Config(sender_dependent_relayhost_maps={"@x.test": "[x-relay.test]"},
                          empty_address_relayhost_maps_lookup_key="MAILER-DAEMON")
    assert nexthop_for("y.test", no_relayhost, "a@x.test").host == "x-relay.test"
    assert nexthop_for("y.test", no_relayhost, "a@z.test") == NextHop("smtp", "y.test", 25, True)
    assert nexthop_for("y.test", no_relayhost, "") == NextHop("smtp", "y.test", 25, True)


def test_bad_next_hop_that_reaches_routing_defers_4_3_5():
    # load_config refuses it; a Config built in code may still hold one: the administrator's
    # problem, so the mail waits for the fix instead of bouncing
    config = Config(transport_maps={"x.test": "pool1:[mail.example:99999"},
                    transport={"pool1": {"smtp_helo_name": "p.test"}})
    with pytest.raises(TransientFailure) as info:
        nexthop_for("x.test", config)
    assert info.value.dsn == "4.3.5"
    assert info.value.text.startswith("bad next hop '[mail.example:99999' for x.test")
