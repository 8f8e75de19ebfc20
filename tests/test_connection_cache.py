"""SMTP connection reuse end to end: the delivery agent with a ConnectionCache against smtp-sink.

Connections are counted by a loopback TCP forwarder in front of the sink (CountingProxy): it
accepts each client connection, keeps what the client sent on it, and passes everything on.
"""

import asyncio
import contextlib
import time

import pytest
import uvloop

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery.connections import ConnectionCache
from engine.delivery.smtp import deliver
from engine.dns import Resolver

LOOPBACK = "127.0.0.1"


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def request_to(port, number=0):
    content = f"Subject: message {number}\r\n\r\nbody {number}\r\n".encode()
    return DeliveryRequest(
        f"4Xyz{number}", "a@x.test", ["b@y.test"], content, NextHop("smtp", LOOPBACK, port, False)
    )


def make_config(**settings):
    return Config(myhostname="client.tern.test", smtp_connect_timeout=2.0, **settings)


class ProxiedConnection:
    def __init__(self):
        self.sent = bytearray()  # everything the client wrote
        self.closed = False  # both directions finished

    def commands(self):
        """The RSET, MAIL and QUIT commands the client sent, in order."""
        lines = bytes(self.sent).split(b"\r\n")
        return [
            line.split(b":")[0].split(b" ")[0].decode()
            for line in lines
            if line in (b"RSET", b"QUIT") or line.startswith(b"MAIL FROM:")
        ]


class CountingProxy:
    """Forwards each connection on a free loopback port to the sink's port; a close on either
    side closes both (so a stopped sink looks stopped to the client)."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.connections: list[ProxiedConnection] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task] = set()

    async def start(self):
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        self._handlers.add(asyncio.current_task())
        connection = ProxiedConnection()
        self.connections.append(connection)
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            _pump(reader, up_writer, connection.sent.extend),
            _pump(up_reader, writer, lambda data: None),
        )
        connection.closed = True

    async def close(self):
        self.server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.wait(self._handlers, timeout=3.0)
        await self.server.wait_closed()


async def _pump(source, sink, record):
    try:
        while data := await source.read(65536):
            record(data)
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        sink.close()


async def eventually(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def proxied(config, *sinks, **limits):
    """A CountingProxy in front of each sink, and a ConnectionCache(config, **limits); all
    closed on the way out whatever happens (a transport left open at loop close hangs uvloop
    when ResourceWarning is an error)."""
    async with contextlib.AsyncExitStack() as stack:
        proxies = []
        for sink in sinks:
            proxy = await CountingProxy(sink.port).start()
            stack.push_async_callback(proxy.close)
            proxies.append(proxy)
        cache = ConnectionCache(config, **limits)
        stack.push_async_callback(cache.close)
        yield proxies, cache


async def deliver_all(config, port, count, cache, *, first=0):
    resolver = Resolver(config)
    return [
        await deliver(request_to(port, first + n), config, resolver, cache) for n in range(count)
    ]


def test_five_messages_go_over_one_connection_with_rset_between(smtp_sink):
    sink = smtp_sink()
    config = make_config()

    async def scenario():
        async with proxied(config, sink) as ((proxy,), cache):
            outcomes = await deliver_all(config, proxy.port, 5, cache)
            assert len(cache) == 1
        return proxy, outcomes  # cache.close() QUITs the idle connection

    proxy, outcomes = run(scenario())
    (connection,) = proxy.connections
    assert connection.commands() == ["MAIL"] + ["RSET", "MAIL"] * 4 + ["QUIT"]
    relay = f"127.0.0.1[127.0.0.1]:{proxy.port}"
    assert {(r.status, r.relay) for o in outcomes for r in o.results} == {("sent", relay)}
    assert [o.conn_use for o in outcomes] == [1, 2, 3, 4, 5]
    assert max(o.connect_seconds for o in outcomes[1:]) < outcomes[0].connect_seconds
    contents = sorted(m.content for m in sink.messages())
    assert contents == [request_to(0, n).content for n in range(5)]


def test_without_a_cache_every_message_has_its_own_connection(smtp_sink):
    sink = smtp_sink()
    config = make_config()

    async def scenario():
        async with proxied(config, sink) as ((proxy,), _):
            outcomes = await deliver_all(config, proxy.port, 5, None)
            await eventually(lambda: all(c.closed for c in proxy.connections))
        return proxy, outcomes

    proxy, outcomes = run(scenario())
    assert [c.commands() for c in proxy.connections] == [["MAIL", "QUIT"]] * 5
    assert [o.conn_use for o in outcomes] == [1] * 5
    assert len(sink.messages()) == 5


def test_idle_time_limit_quits_a_cached_connection(smtp_sink):
    sink = smtp_sink()
    config = make_config(smtp_connection_cache_time_limit=0.2)

    async def scenario():
        async with proxied(config, sink) as ((proxy,), cache):
            outcomes = await deliver_all(config, proxy.port, 1, cache)
            assert len(cache) == 1
            await eventually(lambda: proxy.connections[0].closed)
            assert len(cache) == 0
            outcomes += await deliver_all(config, proxy.port, 1, cache, first=1)
        return proxy, outcomes

    proxy, outcomes = run(scenario())
    assert [c.commands() for c in proxy.connections] == [["MAIL", "QUIT"]] * 2
    assert [o.conn_use for o in outcomes] == [1, 1]
    assert len(sink.messages()) == 2


def test_reuse_count_limit_counts_reuses_as_postfix_does(smtp_sink):
    """smtp_connection_reuse_count_limit = 1: a connection is reused once (two transactions)."""
    sink = smtp_sink()
    config = make_config(smtp_connection_reuse_count_limit=1)

    async def scenario():
        async with proxied(config, sink) as ((proxy,), cache):
            outcomes = await deliver_all(config, proxy.port, 5, cache)
        return proxy, outcomes

    proxy, outcomes = run(scenario())
    assert [c.commands() for c in proxy.connections] == [
        ["MAIL", "RSET", "MAIL", "QUIT"],
        ["MAIL", "RSET", "MAIL", "QUIT"],
        ["MAIL", "QUIT"],
    ]
    assert [o.conn_use for o in outcomes] == [1, 2, 1, 2, 1]
    assert len(sink.messages()) == 5


def test_reuse_time_limit_retires_a_connection(smtp_sink):
    sink = smtp_sink()
    config = make_config(smtp_connection_reuse_time_limit=0.3)

    async def scenario():
        async with proxied(config, sink) as ((proxy,), cache):
            outcomes = await deliver_all(config, proxy.port, 2, cache)
            await asyncio.sleep(0.35)  # within the idle limit (2 s), past the reuse limit
            outcomes += await deliver_all(config, proxy.port, 1, cache, first=2)
        return proxy, outcomes

    proxy, outcomes = run(scenario())
    assert [c.commands() for c in proxy.connections] == [
        ["MAIL", "RSET", "MAIL", "QUIT"],
        ["MAIL", "QUIT"],
    ]
    assert [o.conn_use for o in outcomes] == [1, 2, 1]


def test_connection_killed_by_the_server_is_replaced(smtp_sink):
    """The sink stops and starts again between two deliveries: the cached connection is dead,
    and the second message still goes through, on a new connection, as sent."""
    sink = smtp_sink()
    config = make_config()

    async def scenario():
        async with proxied(config) as (_, cache):
            outcomes = await deliver_all(config, sink.port, 1, cache)
            assert len(cache) == 1
            await asyncio.to_thread(sink.stop)
            await asyncio.to_thread(sink.start)
            outcomes += await deliver_all(config, sink.port, 1, cache, first=1)
        return outcomes

    first, second = run(scenario())
    assert [r.status for r in first.results + second.results] == ["sent", "sent"]
    assert second.conn_use == 1
    assert second.results[0].relay == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert len(sink.messages()) == 2


@pytest.mark.parametrize(
    ("flags", "first_commands"),
    [
        (("-q", "RSET"), ["MAIL", "RSET"]),  # disconnect without a reply
        (("-Q", "RSET"), ["MAIL", "RSET"]),  # 421 and disconnect: no QUIT
        (("-f", "RSET"), ["MAIL", "RSET", "QUIT"]),  # 5xx: QUIT, the session is not reused
    ],
    ids=["disconnect-on-rset", "421-on-rset", "5xx-on-rset"],
)
def test_cached_connection_failing_rset_is_dropped_and_a_new_one_used(
    smtp_sink, flags, first_commands
):
    sink = smtp_sink(*flags)
    config = make_config()

    async def scenario():
        async with proxied(config, sink) as ((proxy,), cache):
            outcomes = await deliver_all(config, proxy.port, 2, cache)
            await eventually(lambda: proxy.connections[0].closed)
        return proxy, outcomes

    proxy, outcomes = run(scenario())
    assert [r.status for o in outcomes for r in o.results] == ["sent", "sent"]
    assert [o.conn_use for o in outcomes] == [1, 1]
    first, second = proxy.connections
    assert first.commands() == first_commands
    assert second.commands() == ["MAIL", "QUIT"]  # QUIT from cache.close()
    assert len(sink.messages()) == 2


def test_close_quits_every_idle_connection_and_caches_no_more(smtp_sink):
    config = make_config()

    async def scenario():
        async with proxied(config, smtp_sink(), smtp_sink()) as (proxies, cache):
            for proxy in proxies:
                await deliver_all(config, proxy.port, 1, cache)
            assert len(cache) == 2
            await cache.close()
            assert len(cache) == 0
            for proxy in proxies:
                await eventually(lambda proxy=proxy: proxy.connections[0].closed)
            (after,) = await deliver_all(config, proxies[0].port, 1, cache, first=1)
            assert len(cache) == 0
        return proxies, after

    proxies, after = run(scenario())
    assert [c.commands() for p in proxies for c in p.connections] == [["MAIL", "QUIT"]] * 3
    assert after.results[0].status == "sent"


def test_per_destination_cap_quits_the_oldest_idle_connection(smtp_sink):
    sink = smtp_sink()
    config = make_config()

    async def scenario():
        async with proxied(config, sink, max_idle_per_destination=1) as ((proxy,), cache):
            resolver = Resolver(config)
            await asyncio.gather(
                *(deliver(request_to(proxy.port, n), config, resolver, cache) for n in range(2))
            )
            assert len(proxy.connections) == 2  # concurrent deliveries, one connection each
            assert len(cache) == 1
            await eventually(lambda: sum(c.closed for c in proxy.connections) == 1)
        return proxy

    proxy = run(scenario())
    assert [c.commands() for c in proxy.connections] == [["MAIL", "QUIT"]] * 2
    assert len(sink.messages()) == 2


def test_total_cap_quits_the_oldest_idle_connection(smtp_sink):
    config = make_config()

    async def scenario():
        async with proxied(config, smtp_sink(), smtp_sink(), max_idle=1) as (proxies, cache):
            for proxy in proxies:
                await deliver_all(config, proxy.port, 1, cache)
            assert len(cache) == 1
            await eventually(lambda: proxies[0].connections[0].closed)
            assert not proxies[1].connections[0].closed

    run(scenario())
