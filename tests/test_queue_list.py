"""`tern queue list`: mailq's layout, and JSON lines, read from the LMDB spool; which
messages are active, asked of the server through its control socket."""

import asyncio
import io
import json
import time
from types import SimpleNamespace

from engine import control
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


def test_mailq_marks_active_and_held_messages():
    active, held, waiting = envelope(), envelope(), envelope()
    active.queue_id, held.queue_id, waiting.queue_id = "ACTIVE0001", "HELD000001", "WAITING001"
    held.held = True
    ids = [line.split()[0] for line in format_mailq([active, held, waiting],
                                                    frozenset({"ACTIVE0001"})).splitlines()
           if line[:1].isalpha()]
    assert ids == ["ACTIVE0001*", "HELD000001!", "WAITING001"]


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
    assert {item["queue_name"] for item in listed} == {"deferred"}  # no server: none active
    # as postqueue -j: only the recipients still to be delivered (done@ was sent)
    assert [(r["address"], r["status"]) for r in listed[0]["recipients"]] == [
        ("slow@example.net", "deferred"), ("new@example.net", "pending")]


def test_json_leaves_out_sent_and_bounced_recipients_only_when_asked():
    env = envelope()
    env.recipients.append(Recipient("gone@example.net", status="bounced"))
    assert len(json_record(env)["recipients"]) == 4  # tern queue show --json: every one
    assert [r["address"] for r in json_record(env, finished=False)["recipients"]] == [
        "slow@example.net", "new@example.net"]


def spool_with(directory, *envelopes):
    async def fill():
        spool = LmdbSpool(directory / "shard0")
        for env in envelopes:
            await spool.enqueue(QueuedMessage(env, [b"x"]))
        spool.close()

    asyncio.run(fill())


def test_list_asks_the_running_server_which_messages_are_active(tmp_path):
    config = Config(myhostname="mx.test", queue_directory=tmp_path)
    delivering, waiting = envelope(), envelope()
    delivering.queue_id, waiting.queue_id = "DELIVERING", "WAITING001"
    spool_with(tmp_path, delivering, waiting)
    manager = SimpleNamespace(_active={"DELIVERING": delivering, "GONE000001": None})

    async def run(as_json):
        server = await control.ControlServer.start(tmp_path, manager)
        try:
            out, err = io.StringIO(), io.StringIO()
            status = await asyncio.to_thread(list_queue, config, out, as_json=as_json, err=err)
            return status, out.getvalue(), err.getvalue()
        finally:
            await server.close()

    status, text, err = asyncio.run(run(False))
    assert (status, err) == (0, "")
    assert "\nDELIVERING*  " in text and "\nWAITING001   " in text
    status, lines, err = asyncio.run(run(True))
    names = {item["queue_id"]: item["queue_name"] for item in map(json.loads, lines.splitlines())}
    assert (status, err, names) == (0, "", {"DELIVERING": "active", "WAITING001": "deferred"})


def test_list_goes_on_with_a_warning_when_the_server_cannot_say(tmp_path):
    config = Config(myhostname="mx.test", queue_directory=tmp_path)
    spool_with(tmp_path, envelope())

    async def run():
        server = await control.ControlServer.start(tmp_path, SimpleNamespace())  # no _active
        try:
            out, err = io.StringIO(), io.StringIO()
            status = await asyncio.to_thread(list_queue, config, out, err=err)
            return status, out.getvalue(), err.getvalue()
        finally:
            await server.close()

    status, text, err = asyncio.run(run())
    assert status == 0 and "\ndZDwdW5pX0      2345 " in text
    assert err.startswith("tern: warning: cannot ask the server for its active queue: ")


def test_json_adds_postqueue_j_keys():
    held = envelope()
    held.held = True
    record = json_record(held)
    assert (record["queue_name"], record["arrival_time"], record["message_size"]) == (
        "hold", int(ARRIVAL), 2345)
    assert record["recipients"][1]["delay_reason"].startswith("connect to mx.example.net")
    assert "delay_reason" not in record["recipients"][2]
    assert json_record(held, frozenset({held.queue_id}))["queue_name"] == "hold"
    assert json_record(envelope())["queue_name"] == "deferred"
    fresh = envelope()
    fresh.recipients = [Recipient("new@example.net")]
    assert json_record(fresh)["queue_name"] == "deferred"  # waiting: Tern has no incoming queue
    assert json_record(fresh, frozenset({fresh.queue_id}))["queue_name"] == "active"
