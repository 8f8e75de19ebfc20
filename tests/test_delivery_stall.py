"""smtp_data_xfer_timeout is Postfix's: a limit on a stall, not on the whole body. A next hop
that reads a large message slowly but steadily gets it although the transfer takes many times
the timeout; one that stops reading is given up after the timeout. Real sockets on loopback
with small kernel buffers (so the bytes cannot all hide in them), DATA and pipelined BDAT."""

import asyncio
import re
import socket

import pytest
from test_delivery_smtp import run

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery import smtp as smtp_agent
from engine.dns import Resolver

BODY = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000  # ~1 MB
TIMEOUT = 0.3  # the whole body takes ~1.5 s at the reader's pace below
PACE = 0.02  # seconds between two 16 KiB reads (~800 KB/s)
BUFFER = 16384


@pytest.fixture
def small_send_buffer(monkeypatch):
    """The client's connections get a small SO_SNDBUF, as a busy host's would."""
    real = asyncio.open_connection

    async def open_connection(*args, **kwargs):
        reader, writer = await real(*args, **kwargs)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        return reader, writer

    monkeypatch.setattr(smtp_agent.asyncio, "open_connection", open_connection)


async def _read_body(reader, size, stall):
    """Read ``size`` bytes (None: up to the end-of-data line) in 16 KiB steps at PACE, or
    nothing at all until ``stall`` (an Event) is set."""
    if stall is not None:
        await stall.wait()
        return b""
    got = b""
    while size is None and not got.endswith(b"\r\n.\r\n") or size is not None and len(got) < size:
        chunk = await reader.read(min(BUFFER, size - len(got)) if size is not None else BUFFER)
        if not chunk:
            break
        got += chunk
        await asyncio.sleep(PACE)
    return got


async def _deliver(extensions, stall=False):
    received, writers = [], []
    stalled = asyncio.Event() if stall else None

    async def peer(reader, writer):
        writers.append(writer)
        writer.write(b"220 slow ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-slow\r\n" + b"".join(b"250-%s\r\n" % e for e in extensions)
                             + b"250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                received.append(await _read_body(reader, None, stalled))
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"BDAT":
                size, last = re.match(rb"BDAT (\d+)( LAST)?", line).groups()
                received.append(await _read_body(reader, int(size), stalled))
                writer.write(b"250 2.0.0 ok\r\n" if last else b"250 2.0.0 chunk\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    for sock in server.sockets:  # accepted connections inherit the small receive buffer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    port = server.sockets[0].getsockname()[1]
    config = Config(myhostname="client.tern.test", smtp_data_xfer_timeout=TIMEOUT,
                    smtp_quit_timeout=1.0)
    request = DeliveryRequest("Q1", "a@x.test", ["b@y.test"], BODY,
                              NextHop("smtp", "127.0.0.1", port, False))
    try:
        outcome = await smtp_agent.deliver(request, config, Resolver(config))
    finally:
        if stalled is not None:
            stalled.set()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
    return outcome.results[0], b"".join(received)


@pytest.mark.parametrize("extensions", [(), (b"PIPELINING", b"CHUNKING")], ids=["DATA", "BDAT"])
def test_slow_steady_reader_gets_a_body_that_takes_longer_than_the_timeout(
        small_send_buffer, extensions):
    result, received = run(_deliver(extensions))
    assert (result.status, result.reply) == ("sent", "250 2.0.0 ok")
    assert received.count(b"x" * 998) == 1000


def test_reader_that_stalls_is_given_up_after_the_timeout(small_send_buffer):
    result, _ = run(_deliver((), stall=True))
    assert result.status == "deferred"
    assert result.reply == "conversation with 127.0.0.1[127.0.0.1] timed out while sending " \
        "message body"
