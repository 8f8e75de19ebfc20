"""A large message is streamed towards the spool, never held whole in memory twice: 30 MB of
DATA through the real adapter into the LMDB spool, with Python's allocations traced."""

import asyncio
import tracemalloc

from abuse import Server, close, replies

from engine.spool.lmdb_spool import LmdbSpool

MB = 1024 * 1024
SIZE = 30 * MB
LINE = b"x" * 998 + b"\r\n"  # the longest line RFC 5321 allows
CHUNK = LINE * 64  # 64 KB per write


def test_30mb_message_is_held_at_most_once(tmp_path):
    async def scenario():
        spool = LmdbSpool(tmp_path / "spool", map_size=256 * MB)
        async with Server(spool=spool, message_size_limit=40 * MB) as srv:
            reader, writer = await srv.connect()
            writer.write(b"EHLO c.test\r\n")
            await replies(reader, 1)
            writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            await replies(reader, 3)
            tracemalloc.start()
            try:
                sent = 0
                while sent < SIZE:
                    writer.write(CHUNK)
                    sent += len(CHUNK)
                    await writer.drain()
                writer.write(b".\r\n")
                queued = await replies(reader, 1)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            await close(writer)
            (envelope,) = spool.envelopes()
            stored = len(spool.content(envelope.queue_id))
        spool.close()
        return queued, peak, sent, stored

    queued, peak, sent, stored = asyncio.run(scenario())
    assert queued[0].startswith("250 2.0.0 Ok: queued as ")
    assert sent <= stored < sent + 4096  # the whole message, plus our headers
    # once (the content, built as it arrives) plus network-sized buffers; twice would be 60 MB
    assert peak < 1.3 * SIZE, f"peak {peak / MB:.1f} MB for a {SIZE / MB:.0f} MB message"
