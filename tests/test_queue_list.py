"""`tern queue list`: mailq's layout, and JSON lines, read from the LMDB spool."""

import asyncio
import io
import json
import time

from engine.cli.queue import format_mailq, json_record, list_queue
from engine.config import Config
from engine.spool import Envelope, QueuedMessage, Recipient
from engine.spool.lmdb_spool import LmdbSpool

ARRIVAL = time.mktime((2026, 11, 21, 13, 40, 11, 0, 0, -1))


def envelope():
    return Envelope(
        queue_id="dZDwdW5pX0", sender="alice@example.org", arrival=ARRIVAL, size=2345,
        recipients=[
            Recipient("done@example.net", status="sent"),
            Recipient("slow@example.net", status="deferred",
                      last_reply="connect to mx.example.net[192.0.2.1]:25: Connection refused"),
            Recipient("new@example.net"),
        ])


def test_mailq_layout():
    assert format_mailq([envelope()]) == (
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        "dZDwdW5pX0      2345 Sat Nov 21 13:40:11  alice@example.org\n"
        "(connect to mx.example.net[192.0.2.1]:25: Connection refused)\n"
        "                                         slow@example.net\n"
        "                                         new@example.net\n"
        "\n"
        "-- 3 Kbytes in 1 Request.\n")


def test_empty_queue():
    assert format_mailq([]) == "Mail queue is empty\n"


def test_list_reads_every_shard_as_json(tmp_path):
    config = Config(myhostname="mx.test", queue_directory=tmp_path)

    async def fill():
        for shard, queue_id in ((0, "A0"), (1, "B1")):
            spool = LmdbSpool(tmp_path / f"shard{shard}")
            env = envelope()
            env.queue_id = queue_id
            await spool.enqueue(QueuedMessage(env, [b"x"]))
            spool.close()

    asyncio.run(fill())
    out = io.StringIO()
    assert list_queue(config, out, as_json=True) == 0
    listed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(item["queue_id"] for item in listed) == ["A0", "B1"]
    assert listed[0]["recipients"][1]["status"] == "deferred"


def test_json_adds_postqueue_j_keys():
    held = envelope()
    held.held = True
    record = json_record(held)
    assert (record["queue_name"], record["arrival_time"], record["message_size"]) == (
        "hold", int(ARRIVAL), 2345)
    assert record["recipients"][1]["delay_reason"].startswith("connect to mx.example.net")
    assert "delay_reason" not in record["recipients"][2]
    assert json_record(envelope())["queue_name"] == "deferred"
    fresh = envelope()
    fresh.recipients = [Recipient("new@example.net")]
    assert json_record(fresh)["queue_name"] == "active"
