"""Postfix's smtp_skip_quit_response: once a delivery's outcome is known, QUIT goes out and
the connection closes without waiting for the reply, so a next hop that never answers QUIT
delays neither the recorded result nor the next MX host. Real sockets on loopback."""

import asyncio

from test_delivery_smtp import run

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop, TransientFailure
from engine.delivery import smtp as smtp_agent
from engine.dns import Resolver

BOUND = 10  # seconds: a safety bound on the test, far below smtp_quit_timeout


async def _deliver_to(greeting):
    """Deliver to a peer that greets with ``greeting``, takes the message, and on QUIT waits
    (without answering) until the delivery has returned. Returns the outcome or error and
    whether the peer saw QUIT."""
    delivered, quit_seen = asyncio.Event(), asyncio.Event()

    async def peer(reader, writer):
        writer.write(greeting)
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-peer\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
            elif line == b".\r\n":
                writer.write(b"250 2.0.0 queued as X\r\n")
            elif verb == b"QUIT":
                quit_seen.set()
                await delivered.wait()
                break
            elif verb in (b"MAIL", b"RCPT"):
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = Config(myhostname="client.tern.test", smtp_quit_timeout=300.0)
    request = DeliveryRequest("Q1", "a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nhi\r\n",
                              NextHop("smtp", "127.0.0.1", port, False))
    try:
        try:
            result = await asyncio.wait_for(
                smtp_agent.deliver(request, config, Resolver(config)), BOUND)
        except TransientFailure as error:
            result = error
        delivered.set()
        await asyncio.wait_for(quit_seen.wait(), BOUND)
    finally:
        delivered.set()
        server.close()
        await server.wait_closed()
    return result


def test_result_does_not_wait_for_the_quit_reply():
    outcome = run(_deliver_to(b"220 peer ESMTP\r\n"))
    assert [(r.status, r.reply) for r in outcome.results] == [("sent", "250 2.0.0 queued as X")]


def test_failed_session_does_not_wait_for_the_quit_reply():
    error = run(_deliver_to(b"554 5.3.2 not today\r\n"))  # QUIT follows a refused greeting
    assert isinstance(error, TransientFailure)
    assert error.text.endswith("554 5.3.2 not today")
