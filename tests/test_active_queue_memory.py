"""The queue manager's memory stays flat whatever the queue size (qmgr_message_active_limit).

200,000 messages wait in a real LMDB spool; the queue manager fills its active queue from the
spool's due index and stops at the limit. Python heap growth while it runs is measured with
tracemalloc for a queue of 20,000 and of 200,000: the second must not be ten times the first.
"""

import asyncio
import io
import tracemalloc

from engine.config import Config
from engine.log import Maillog
from engine.qmgr.manager import QueueManager
from engine.spool import Envelope, QueuedMessage, Recipient
from engine.spool.lmdb_spool import LmdbSpool

ACTIVE_LIMIT = 500
BODY = [b"Subject: queued\r\n\r\nbody\r\n"]


async def fill(spool: LmdbSpool, count: int) -> None:
    for start in range(0, count, 5000):
        await asyncio.gather(*(
            spool.enqueue(QueuedMessage(Envelope(
                queue_id=f"Q{i:07d}", sender="s@example.org", arrival=1000.0 + i, size=30,
                recipients=[Recipient(f"r{i % 50}@d{i % 97}.example.net",
                                      next_attempt=1000.0 + i)]), BODY))
            for i in range(start, min(count, start + 5000))))


async def heap_growth_while_active(tmp_path, count: int) -> tuple[int, int]:
    spool = LmdbSpool(tmp_path / f"spool{count}", map_size=1 << 30, commit_window=0)
    await fill(spool, count)
    blocked = asyncio.Event()

    async def agent(request):
        await blocked.wait()  # deliveries never end: the active queue stays full

    config = Config(myhostname="mx.test", relayhost="[127.0.0.1]:2526",
                    qmgr_message_active_limit=ACTIVE_LIMIT)
    qmgr = QueueManager(spool, config, Maillog("mx.test", stream=io.StringIO()),
                        {"smtp": agent}, clock=lambda: 10.0 ** 9)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await qmgr.start()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(qmgr._active) >= ACTIVE_LIMIT:
            break
    await asyncio.sleep(0.1)
    growth = tracemalloc.get_traced_memory()[0] - before
    active = len(qmgr._active)
    tracemalloc.stop()
    await qmgr.stop()
    spool.close()
    return growth, active


def test_memory_is_flat_from_20k_to_200k_queued_messages(tmp_path):
    small, small_active = asyncio.run(heap_growth_while_active(tmp_path, 20_000))
    large, large_active = asyncio.run(heap_growth_while_active(tmp_path, 200_000))
    assert small_active == large_active == ACTIVE_LIMIT
    # Ten times the queue; the heap may differ by noise, not by a factor tied to queue size.
    print(f"heap growth: {small} bytes at 20k queued, {large} at 200k")
    assert large < small * 2, (small, large)
