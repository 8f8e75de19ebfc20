"""engine.dns against a real unbound serving a static test zone on loopback."""

import asyncio
import time

import pytest
import uvloop
from peers import free_port

from engine.config import Config
from engine.delivery import PermanentFailure, TransientFailure
from engine.dns import Resolver

RECORDS = [
    "mx.test. 60 IN MX 20 mail2.mx.test.",
    "mx.test. 60 IN MX 10 mail1.mx.test.",
    "mx.test. 60 IN MX 20 mail3.mx.test.",
    "mail1.mx.test. 60 IN A 127.0.0.1",
    "nullmx.test. 60 IN MX 0 .",
    "aonly.test. 60 IN A 127.0.0.1",
    "dual.test. 60 IN A 127.0.0.2",
    "dual.test. 60 IN AAAA ::1",
]


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@pytest.fixture
def resolver(dns_server):
    host, port = dns_server(RECORDS)
    return Resolver(Config(dns_servers=(f"{host}:{port}",), dns_timeout=2.0))


def test_mx_hosts_in_preference_order_random_among_equals(resolver):
    async def many():
        return [tuple(await resolver.mx_hosts("mx.test")) for _ in range(40)]

    orders = set(run(many()))
    assert {order[0] for order in orders} == {"mail1.mx.test"}
    assert orders == {
        ("mail1.mx.test", "mail2.mx.test", "mail3.mx.test"),
        ("mail1.mx.test", "mail3.mx.test", "mail2.mx.test"),
    }


def test_null_mx_is_permanent(resolver):
    with pytest.raises(PermanentFailure) as info:
        run(resolver.mx_hosts("nullmx.test"))
    assert info.value.dsn == "5.1.10"
    assert info.value.text == "Domain nullmx.test does not accept mail (nullMX)"


def test_domain_without_mx_is_its_own_mail_host(resolver):
    assert run(resolver.mx_hosts("aonly.test")) == ["aonly.test"]
    assert run(resolver.addresses("aonly.test")) == ["127.0.0.1"]


def test_nxdomain_is_permanent(resolver):
    with pytest.raises(PermanentFailure) as info:
        run(resolver.mx_hosts("nowhere.test"))
    assert info.value.dsn == "5.1.2"
    assert info.value.text == (
        "Host or domain name not found. Name service error for name=nowhere.test type=MX: "
        "Host not found"
    )


def test_addresses_of_both_families(resolver):  # their order: tests/test_dns_resolver.py
    assert sorted(run(resolver.addresses("dual.test"))) == ["127.0.0.2", "::1"]


def test_address_literal_needs_no_dns(resolver):
    assert run(resolver.addresses("127.0.0.9")) == ["127.0.0.9"]
    assert run(resolver.addresses("[::1]")) == ["::1"]
    assert run(resolver.mx_hosts("[127.0.0.9]")) == ["127.0.0.9"]
    assert run(resolver.mx_hosts("[IPv6:2001:DB8::1]")) == ["2001:db8::1"]
    assert run(resolver.addresses("[IPv6:::1]")) == ["::1"]


@pytest.mark.parametrize("literal", ["[IPv6:127.0.0.1]", "[1.2.3]", "[]", "[mail.example]"])
def test_bad_address_literal_is_permanent_without_a_query(literal):
    """Read as engine.ipliteral does: an IPv4 address in an IPv6 tag is no literal, and a
    bracketed string never goes to DNS (the server here does not answer)."""
    config = Config(dns_servers=(f"127.0.0.1:{free_port(udp=True)}",), dns_timeout=0.5)
    resolver = Resolver(config)
    for lookup in (resolver.mx_hosts, resolver.addresses):
        with pytest.raises(PermanentFailure) as info:
            run(lookup(literal))
        assert (info.value.dsn, info.value.text) == ("5.1.2", f"bad address literal {literal}")


def test_host_without_address_is_permanent(resolver):
    with pytest.raises(PermanentFailure) as info:
        run(resolver.addresses("mx.test"))
    assert info.value.dsn == "5.4.4"
    with pytest.raises(PermanentFailure) as info:
        run(resolver.addresses("nowhere.test"))
    assert info.value.dsn == "5.4.4"
    assert "name=nowhere.test type=A: Host not found" in info.value.text


def test_unreachable_dns_server_is_transient():
    config = Config(dns_servers=(f"127.0.0.1:{free_port(udp=True)}",), dns_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransientFailure) as info:
        run(Resolver(config).mx_hosts("mx.test"))
    assert time.monotonic() - started < 5
    assert info.value.dsn == "4.4.3"
    assert info.value.text.endswith("name=mx.test type=MX: Host not found, try again")


@pytest.mark.parametrize("name", [
    "a" * 64 + ".test",  # a label over 63 octets
    ".".join(["a" * 60] * 5) + ".test",  # a name over 255 octets
    "a..b.test",  # an empty label
])
def test_malformed_domain_name_is_permanent_never_deferred(resolver, name):
    """Postfix's valid_hostname() check: no DNS query can ever find such a name, so it bounces
    (5.1.2 for the recipient domain, 5.4.4 for a host) instead of deferring until it expires."""
    with pytest.raises(PermanentFailure) as info:
        run(resolver.mx_hosts(name))
    assert (info.value.dsn, info.value.text) == (
        "5.1.2", f"Host or domain name not found. Name service error for name={name} type=MX: "
        "Malformed domain name")
    with pytest.raises(PermanentFailure) as info:
        run(resolver.addresses(name))
    assert info.value.dsn == "5.4.4"


def test_mx_hosts_are_names_that_keep_their_preference(resolver):
    import copy
    import pickle

    hosts = run(resolver.mx_hosts("mx.test"))
    assert [(host, host.preference) for host in hosts[:1]] == [("mail1.mx.test", 10)]
    assert {host.preference for host in hosts[1:]} == {20}
    for same in (copy.deepcopy(hosts[0]), pickle.loads(pickle.dumps(hosts[0]))):
        assert (same, same.preference) == ("mail1.mx.test", 10)
