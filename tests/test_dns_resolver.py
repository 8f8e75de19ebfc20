"""engine.dns's resolver settings against real DNS servers on loopback: a tiny counting UDP
server (to see which queries reach the wire: TTL cache, attempts, SERVFAIL) and unbound
(address preference)."""

import asyncio
import socket
import threading
import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop
from test_dns import RECORDS

from engine.config import Config
from engine.delivery import TransientFailure
from engine.dns import Resolver


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class CountingServer:
    """A UDP DNS server on 127.0.0.1 that answers every A query with 127.0.0.1 and ``ttl``
    (or SERVFAIL), ignoring the first ``drop`` queries of each name and type; ``queries``
    lists the (name, type) asked, e.g. ("host.test", "A")."""

    def __init__(self, *, ttl: int = 60, drop: int = 0, servfail: bool = False) -> None:
        self.ttl, self.drop, self.servfail = ttl, drop, servfail
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            question = query.question[0]
            key = (question.name.to_text(omit_final_dot=True),
                   dns.rdatatype.to_text(question.rdtype))
            self.queries.append(key)
            if self.queries.count(key) <= self.drop:
                continue
            reply = dns.message.make_response(query)
            if self.servfail:
                reply.set_rcode(dns.rcode.SERVFAIL)
            elif query.question[0].rdtype == dns.rdatatype.A:
                name = query.question[0].name
                reply.answer.append(dns.rrset.from_text(name, self.ttl, "IN", "A", "127.0.0.1"))
            self.sock.sendto(reply.to_wire(), peer)

    def config(self, **settings) -> Config:
        return Config(dns_servers=(f"127.0.0.1:{self.port}",), **settings)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def counting_server():
    servers: list[CountingServer] = []

    def make(**options) -> CountingServer:
        servers.append(CountingServer(**options))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_answers_are_cached_for_their_ttl(counting_server):
    server = counting_server(ttl=1)
    resolver = Resolver(server.config(dns_timeout=2.0))

    async def twice():
        return [await resolver.addresses("host.test") for _ in range(2)]

    assert run(twice()) == [["127.0.0.1"]] * 2
    assert server.queries.count(("host.test", "A")) == 1  # the second came from the cache
    time.sleep(1.2)  # past the TTL
    assert run(resolver.addresses("host.test")) == ["127.0.0.1"]
    assert server.queries.count(("host.test", "A")) == 2


@pytest.mark.parametrize("attempts, answered", [(1, False), (2, True)])
def test_dns_attempts_retry_a_server_that_did_not_answer(counting_server, attempts, answered):
    server = counting_server(drop=1)
    resolver = Resolver(server.config(dns_timeout=0.3, dns_attempts=attempts))
    if answered:
        assert run(resolver.addresses("host.test")) == ["127.0.0.1"]
    else:
        with pytest.raises(TransientFailure):
            run(resolver.addresses("host.test"))
    assert server.queries.count(("host.test", "A")) == (2 if answered else 1)


def test_servfail_is_transient(counting_server):
    server = counting_server(servfail=True)
    with pytest.raises(TransientFailure) as info:
        run(Resolver(server.config(dns_timeout=1.0)).mx_hosts("host.test"))
    assert info.value.dsn == "4.4.3"
    assert info.value.text.endswith("name=host.test type=MX: Host not found, try again")


@pytest.mark.parametrize(
    "preference, first", [("ipv4", "127.0.0.2"), ("ipv6", "::1")]
)
def test_address_preference_puts_that_family_first(dns_server, preference, first):
    host, port = dns_server(RECORDS)
    config = Config(dns_servers=(f"{host}:{port}",), smtp_address_preference=preference)
    addresses = run(Resolver(config).addresses("dual.test"))
    assert addresses[0] == first and sorted(addresses) == ["127.0.0.2", "::1"]


def test_address_preference_any_is_random_order(dns_server):
    host, port = dns_server(RECORDS)
    resolver = Resolver(Config(dns_servers=(f"{host}:{port}",), smtp_address_preference="any"))

    async def many():
        return {tuple(await resolver.addresses("dual.test")) for _ in range(40)}

    assert run(many()) == {("127.0.0.2", "::1"), ("::1", "127.0.0.2")}
