"""`tern queue` show, summary, hold, release, delete, requeue, flush: the control channel
(engine.control) against a stand-in queue manager, the commands on a spool with no server, and
end to end against a real `tern serve` with smtp-sink as the next hop."""

import asyncio
import io
import json
import os
import re
import socket
import stat
import time

import pytest
from test_end_to_end import send

from engine import control
from engine.cli.main import main
from engine.cli.show import format_message, split_content
from engine.cli.summary import bucket, format_table, shape, summarize
from engine.config import Config
from engine.spool import Envelope, QueuedMessage, Recipient
from engine.spool.lmdb_spool import LmdbSpool

NOW = time.mktime((2026, 11, 21, 13, 40, 11, 0, 0, -1))
CONTENT = b"Subject: hello\r\nFrom: <alice@example.org>\r\n\r\nfirst line\r\nlast line\r\n"


# -- the control channel ---------------------------------------------------------------------


class StandInManager:
    """Records each call; answers with the IDs it was given (or ["ALL"])."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self._active = {"Q1": None, "Q2": None}  # the active queue: queue ID → envelope
        self.blocked: asyncio.Event | None = None  # set: hold waits for it

    async def _op(self, name, queue_ids, **extra):
        self.calls.append((name, queue_ids, *extra.values()))
        if queue_ids == ["boom"]:
            raise RuntimeError("spool on fire")
        return queue_ids or ["ALL"]

    async def hold(self, queue_ids):
        if self.blocked is not None:
            await self.blocked.wait()
        return await self._op("hold", queue_ids)

    async def release(self, queue_ids):
        return await self._op("release", queue_ids)

    async def requeue(self, queue_ids):
        return await self._op("requeue", queue_ids)

    async def delete(self, queue_ids, *, deferred_only=False):
        return await self._op("delete", queue_ids, deferred_only=deferred_only)

    async def flush(self, domain=None):
        self.calls.append(("flush", domain))
        return ["F1"]


def with_control(directory, body):
    """Run ``body(server)`` (a coroutine function) with a ControlServer on ``directory``."""
    async def run():
        server = await control.ControlServer.start(directory, StandInManager())
        try:
            return await body(server)
        finally:
            await server.close()

    return asyncio.run(run())


def ask(directory, op, **arguments):
    return asyncio.to_thread(control.request, directory, op, timeout=5, **arguments)


def test_control_requests_call_the_queue_manager(tmp_path):
    async def body(server):
        assert await ask(tmp_path, "hold", ids=["A1", "B2"]) == ["A1", "B2"]
        assert await ask(tmp_path, "release", ids=None) == ["ALL"]
        assert await ask(tmp_path, "delete", ids=None, deferred_only=True) == ["ALL"]
        assert await ask(tmp_path, "requeue", ids=["C3"]) == ["C3"]
        assert await ask(tmp_path, "flush", domain="example.net") == ["F1"]
        assert await ask(tmp_path, "active") == ["Q1", "Q2"]
        return server.qmgr.calls

    assert with_control(tmp_path, body) == [
        ("hold", ["A1", "B2"]), ("release", None), ("delete", None, True),
        ("requeue", ["C3"]), ("flush", "example.net")]


@pytest.mark.parametrize(("line", "error"), [
    (b"not json\n", "bad request: "),
    (b'{"op": "format_disk"}\n',
     'bad request: "op" must be one of active, delete, flush, hold, '),
    (b'{"op": ["hold"]}\n', 'bad request: "op" must be one of '),
    (b'["op", "hold"]\n', 'bad request: "op" must be one of '),
    (b'\xff\xfe{}\n', "bad request: "),
    # json.loads raises RecursionError, not ValueError: still an answer, the connection goes on
    pytest.param(b"[" * 100_000 + b"\n", "bad request: maximum recursion depth", id="nested"),
    (b'{"op": "hold", "ids": "A1"}\n', 'bad request: "ids" must be a list'),
    (b'{"op": "delete", "ids": null, "deferred_only": "yes"}\n', 'bad request: "deferred_only"'),
    (b'{"op": "flush", "domain": 7}\n', 'bad request: "domain" must be'),
    (b'{"op": "hold", "ids": ["boom"]}\n', "RuntimeError: spool on fire"),
])
def test_control_answers_a_bad_or_failed_request_with_an_error_and_goes_on(tmp_path, line, error):
    async def body(server):
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "control"))
        writer.write(line + b'{"op": "hold", "ids": ["A1"]}\n')
        replies = [json.loads(await reader.readline()) for _ in range(2)]
        writer.close()
        return replies

    refused, accepted = with_control(tmp_path, body)
    assert refused["ok"] is False and refused["error"].startswith(error)
    assert accepted == {"ok": True, "ids": ["A1"]}


def test_active_is_answered_while_a_change_is_in_progress(tmp_path):
    async def body(server):
        server.qmgr.blocked = asyncio.Event()
        holding = asyncio.ensure_future(ask(tmp_path, "hold", ids=["A1"]))
        await asyncio.sleep(0.2)
        assert not holding.done()
        assert await asyncio.wait_for(ask(tmp_path, "active"), 2) == ["Q1", "Q2"]
        server.qmgr.blocked.set()
        return await holding

    assert with_control(tmp_path, body) == ["A1"]


def test_control_socket_is_private_and_removed_at_close(tmp_path):
    async def body(server):
        return stat.S_IMODE(os.stat(tmp_path / "control").st_mode)

    assert with_control(tmp_path, body) == 0o600
    assert not (tmp_path / "control").exists()
    with pytest.raises(control.ControlUnavailable):
        control.request(tmp_path, "hold", ids=None)


def test_control_works_in_a_queue_directory_too_long_for_sun_path(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / "control")) > control.SUN_PATH_MAX

    async def body(server):
        return await ask(deep, "requeue", ids=["A1"])

    assert with_control(deep, body) == ["A1"]
    assert not (deep / "control").exists()


def test_stale_socket_is_replaced_but_a_live_server_is_refused(tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "control"))
    stale.close()  # the file stays, nobody listens: a server that was killed

    async def body(server):
        with pytest.raises(control.ControlError, match="another tern serve answers"):
            await control.ControlServer.start(tmp_path, StandInManager())
        return await ask(tmp_path, "hold", ids=["A1"])

    assert with_control(tmp_path, body) == ["A1"]


# -- show and summary formats ----------------------------------------------------------------


def envelope(queue_id="dZDwdW5pX0", *, arrival=NOW, held=False, recipients=None):
    return Envelope(
        queue_id=queue_id, sender="alice@example.org", arrival=arrival, size=len(CONTENT),
        held=held, client="client.test[192.0.2.9]",
        recipients=recipients or [
            Recipient("done@example.net", status="sent", attempts=1, dsn="2.0.0"),
            Recipient("slow@example.net", status="deferred", attempts=2, dsn="4.4.1",
                      next_attempt=NOW + 600,
                      last_reply="connect to mx.example.net[192.0.2.1]:25: Connection refused"),
            Recipient("new@other.test"),
        ])


def test_show_is_postcat_layout():
    assert format_message(envelope(), CONTENT) == (
        "*** ENVELOPE RECORDS deferred/dZDwdW5pX0 ***\n"
        f"message_size: {len(CONTENT)}\n"
        "message_arrival_time: Sat Nov 21 13:40:11 2026\n"
        "sender: alice@example.org\n"
        "client: client.test[192.0.2.9]\n"
        "recipient: done@example.net\n"
        "    status: sent, attempts: 1, dsn: 2.0.0\n"
        "recipient: slow@example.net\n"
        "    status: deferred, attempts: 2, dsn: 4.4.1, next attempt: Sat Nov 21 13:50:11 2026\n"
        "    reason: connect to mx.example.net[192.0.2.1]:25: Connection refused\n"
        "recipient: new@other.test\n"
        "    status: pending, attempts: 0\n"
        "*** MESSAGE CONTENTS deferred/dZDwdW5pX0 ***\n"
        "Subject: hello\n"
        "From: <alice@example.org>\n"
        "\n"
        "first line\n"
        "last line\n"
        "*** MESSAGE FILE END deferred/dZDwdW5pX0 ***\n")
    assert format_message(envelope(held=True), CONTENT, ("body",)) == (
        "*** MESSAGE CONTENTS hold/dZDwdW5pX0 ***\nfirst line\nlast line\n"
        "*** MESSAGE FILE END hold/dZDwdW5pX0 ***\n")
    assert format_message(envelope(), CONTENT, ("body",), frozenset({"dZDwdW5pX0"})) == (
        "*** MESSAGE CONTENTS active/dZDwdW5pX0 ***\nfirst line\nlast line\n"
        "*** MESSAGE FILE END active/dZDwdW5pX0 ***\n")


@pytest.mark.parametrize(("content", "headers", "body"), [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"body\r\n"),
    (b"A: 1\r\n", b"A: 1\r\n", b""),  # no body at all
    (b"\r\nonly body\r\n", b"", b"only body\r\n"),
    (b"A: 1\r\n\r\n\r\nsecond empty line is body\r\n", b"A: 1\r\n",
     b"\r\nsecond empty line is body\r\n"),
])
def test_content_splits_at_the_first_empty_line(content, headers, body):
    assert split_content(content) == (headers, body)


@pytest.mark.parametrize(("minutes", "column"), [
    (0, 0), (4.99, 0), (5, 1), (9.9, 1), (10, 2), (639, 7), (640, 8), (1279, 8), (1280, 9),
    (100000, 9)])
def test_age_buckets_are_qshapes(minutes, column):
    assert bucket(minutes) == column


def test_summary_counts_unfinished_recipients_by_domain_and_age():
    config = Config(myhostname="mx.test")
    envelopes = [
        envelope("A", arrival=NOW - 60),  # 1 minute: slow@example.net, new@other.test
        envelope("B", arrival=NOW - 30 * 60, recipients=[Recipient("x@example.net"),
                                                          Recipient("y@example.net")]),
        envelope("C", arrival=NOW - 2 * 86400, recipients=[Recipient("postmaster")]),
    ]
    assert format_table(shape(envelopes, config, NOW)) == (
        "            T 5 10 20 40 80 160 320 640 1280 1280+\n"
        "      TOTAL 5 2  0  0  2  0   0   0   0    0     1\n"
        "example.net 3 1  0  0  2  0   0   0   0    0     0\n"
        "    mx.test 1 0  0  0  0  0   0   0   0    0     1\n"
        " other.test 1 1  0  0  0  0   0   0   0    0     0\n")
    senders = shape(envelopes, config, NOW, senders=True)
    assert [(row.domain, row.total) for row in senders] == [("TOTAL", 3), ("example.org", 3)]


# -- the commands on a spool with no server running ------------------------------------------


@pytest.fixture
def offline(tmp_path):
    """A config file and a spool (shard0, shard1) holding three messages; no server."""
    config_file = tmp_path / "tern.toml"
    config_file.write_text(f'myhostname = "mx.test"\nqueue_directory = "{tmp_path}/spool"\n'
                           f'maillog_file = "{tmp_path}/maillog"\n')

    async def fill():
        for shard, queue_ids in ((0, ["A0", "C0"]), (1, ["B1"])):
            spool = LmdbSpool(tmp_path / "spool" / f"shard{shard}")
            for number, queue_id in enumerate(queue_ids):
                message = envelope(queue_id, arrival=time.time() - 60 * (number + 1))
                await spool.enqueue(QueuedMessage(message, [CONTENT]))
            spool.close()

    asyncio.run(fill())
    return config_file, tmp_path / "maillog"


def tern(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def listed(capsys, config_file) -> dict[str, dict]:
    status, out, _ = tern(capsys, "queue", "list", "--json", "--config", str(config_file))
    assert status == 0
    return {item["queue_id"]: item for item in map(json.loads, out.splitlines())}


def test_offline_hold_release_delete_work_on_every_shard(capsys, offline):
    config_file, maillog = offline
    config = ("--config", str(config_file))
    assert tern(capsys, "queue", "hold", "A0", "B1!", *config) == (
        0, "", "tern: Placed on hold: 2 messages\n")
    queue = listed(capsys, config_file)
    assert (queue["A0"]["held"], queue["B1"]["held"], queue["C0"]["held"]) == (True, True, False)
    assert queue["A0"]["queue_name"] == "hold"
    status, out, _ = tern(capsys, "queue", "list", *config)
    assert "A0!" in out and "B1!" in out and "C0!" not in out
    assert tern(capsys, "queue", "release", "ALL", *config)[0] == 0
    assert not any(item["held"] for item in listed(capsys, config_file).values())
    assert tern(capsys, "queue", "delete", "C0", *config) == (0, "", "tern: Deleted: 1 message\n")
    assert sorted(listed(capsys, config_file)) == ["A0", "B1"]
    log = maillog.read_text()
    for line in ["A0: placed on hold", "B1: placed on hold", "A0: released from hold",
                 "C0: removed"]:
        assert line in log


def recipient(item: dict, address: str) -> dict:
    """One recipient of a listed message, by address."""
    (found,) = (r for r in item["recipients"] if r["address"] == address)
    return found


def test_offline_delete_deferred_and_requeue(capsys, offline):
    config_file, _ = offline
    config = ("--config", str(config_file))
    before = time.time()
    assert tern(capsys, "queue", "requeue", "ALL", *config)[2] == "tern: Requeued: 3 messages\n"
    for item in listed(capsys, config_file).values():
        assert before <= recipient(item, "slow@example.net")["next_attempt"] <= time.time()
    assert tern(capsys, "queue", "delete", "--deferred", *config)[0] == 0
    assert listed(capsys, config_file) == {}


def test_offline_flush_makes_deferred_mail_due_for_the_next_start(capsys, offline):
    config_file, _ = offline
    before = time.time()
    assert tern(capsys, "queue", "flush", "--domain", "example.net",
                "--config", str(config_file)) == (0, "", "")
    for item in listed(capsys, config_file).values():
        assert before <= recipient(item, "slow@example.net")["next_attempt"] <= time.time()
        assert recipient(item, "new@other.test")["next_attempt"] == 0  # another domain
        assert item["queue_name"] == "deferred"  # no server: nothing is active


def test_named_message_that_is_not_queued_is_exit_1_and_the_others_are_done(capsys, offline):
    config_file, _ = offline
    status, _, err = tern(capsys, "queue", "hold", "A0", "NOPE", "--config", str(config_file))
    assert status == 1
    assert "tern: NOPE: no such message\n" in err and "Placed on hold: 1 message" in err
    assert listed(capsys, config_file)["A0"]["held"] is True
    assert tern(capsys, "queue", "show", "NOPE", "--config", str(config_file)) == (
        1, "", "tern: NOPE: no such message\n")
    assert tern(capsys, "queue", "delete", "NOPE", "--config", str(config_file))[0] == 1


@pytest.mark.parametrize("argv", [
    ["queue", "hold"],  # nothing named
    ["queue", "delete", "ALL", "A0"],
    ["queue", "summary", "incoming"],
    ["queue", "show"],
    ["queue", "frobnicate"],
])
def test_usage_errors_are_exit_2(capsys, offline, argv):
    config_file, _ = offline
    with pytest.raises(SystemExit) as exit_status:
        main([*argv, "--config", str(config_file)])
    assert exit_status.value.code == 2
    assert "usage: tern queue" in capsys.readouterr().err


def test_config_error_is_exit_2(capsys, tmp_path):
    missing = tmp_path / "missing.toml"
    status, _, err = tern(capsys, "queue", "release", "ALL", "--config", str(missing))
    assert status == 2 and err.startswith(f"tern: fatal: {missing}: cannot read")


def test_show_and_summary_json_read_the_spool(capsys, offline):
    config_file, _ = offline
    status, out, _ = tern(capsys, "queue", "show", "B1", "--json", "--config", str(config_file))
    shown = json.loads(out)
    assert status == 0 and shown["queue_id"] == "B1" and shown["queue_name"] == "deferred"
    assert shown["headers"] == "Subject: hello\r\nFrom: <alice@example.org>\r\n"
    assert shown["body"] == "first line\r\nlast line\r\n"
    assert shown["recipients"][1]["delay_reason"].startswith("connect to mx.example.net")
    out = io.StringIO()
    config = Config(myhostname="mx.test", queue_directory=config_file.parent / "spool")
    assert summarize(config, out, as_json=True) == 0
    summary = json.loads(out.getvalue())
    assert summary["buckets"][0] == "5" and summary["buckets"][-1] == "1280+"
    assert summary["total"] == {"total": 6, "counts": [6, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
    assert summary["domains"] == [
        {"domain": "example.net", "total": 3, "counts": [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]},
        {"domain": "other.test", "total": 3, "counts": [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]}]


def test_summary_counts_mail_not_on_hold_unless_hold_is_asked_for(capsys, offline):
    config_file, _ = offline
    config = ("--config", str(config_file))
    assert tern(capsys, "queue", "hold", "A0", *config)[0] == 0

    def total(*queues):
        status, out, _ = tern(capsys, "queue", "summary", *queues, "--json", *config)
        assert status == 0
        return json.loads(out)["total"]["total"]

    # two unfinished recipients in each message; A0 is held
    assert (total(), total("deferred", "active"), total("hold"), total("active"),
            total("hold", "deferred", "active")) == (4, 4, 2, 0, 6)
    status, out, _ = tern(capsys, "queue", "summary", "--senders", *config)
    assert status == 0 and out.splitlines()[1].split()[:2] == ["TOTAL", "2"]


def test_summary_help_names_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["queue", "summary", "--help"])
    assert "(default: deferred and active, every message not on hold)" in " ".join(
        capsys.readouterr().out.split())


# -- end to end: a real `tern serve`, smtp-sink as the next hop ---------------------------------

FAST = {"minimal_backoff_time": "1s", "maximal_backoff_time": "2s", "queue_run_delay": "1s"}


def queue(server, *args: str):
    return server.tern("queue", *args, "--config", str(server.config_file))


def ok(server, *args: str) -> str:
    """Run ``tern queue ARGS``, which must succeed; its standard output."""
    result = queue(server, *args)
    assert result.returncode == 0, f"tern queue {' '.join(args)}: {result.stderr}"
    return result.stdout


def deferred(server, sender="a@example.org", recipients=("b@example.net",),
             subject="later") -> str:
    """Send one message and wait until its first attempt was deferred (the sink is down)."""
    queue_id = send(server, sender, list(recipients),
                    f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
    server.wait_log(f"{queue_id}: to=<{recipients[0]}>")
    return queue_id


def subject(message) -> str:
    return re.search(rb"\r\nSubject: (.*)\r\n", message.content).group(1).decode()


def test_hold_keeps_a_deferred_message_until_release(tern, smtp_sink):
    sink = smtp_sink(start=False)
    server = tern(relayhost=sink.nexthop, worker_count=1, **FAST)  # the server is one process
    queue_id = deferred(server)
    held = queue(server, "hold", queue_id)
    assert held.returncode == 0, held.stderr
    assert held.stderr == "tern: Placed on hold: 1 message\n"
    # done inside the server (through its control socket): its process logs it
    server.wait_log(f"tern/postsuper[{server.process.pid}]: {queue_id}: placed on hold")
    assert f"{queue_id}!" in queue(server, "list").stdout
    sink.start()
    time.sleep(3.5)  # past the longest backoff and a queue run: a held message stays
    assert sink.messages() == []
    assert queue(server, "release", queue_id).returncode == 0
    server.wait_log(f"{queue_id}: released from hold")
    server.wait_log(f"{queue_id}: removed")
    assert len(sink.wait_messages(1)) == 1


def test_flush_delivers_deferred_mail_now_for_one_domain_or_all(tern, smtp_sink):
    sink = smtp_sink(start=False)
    # backoff far longer than the test: only a flush brings the mail back before it ends
    server = tern(relayhost=sink.nexthop, minimal_backoff_time="1h", maximal_backoff_time="1h",
                  queue_run_delay="1s")
    to_net = deferred(server, recipients=("b@example.net",), subject="net")
    to_org = deferred(server, recipients=("c@example.com",), subject="com")
    sink.start()
    flushed = queue(server, "flush", "--domain", "example.net")
    assert flushed.returncode == 0, flushed.stderr
    server.wait_log(f"{to_net}: removed")
    assert [m.recipients for m in sink.wait_messages(1)] == [("b@example.net",)]
    assert f"{to_org}: removed" not in server.log()
    assert queue(server, "flush").returncode == 0
    server.wait_log(f"{to_org}: removed")
    assert len(sink.wait_messages(2)) == 2


def test_delete_named_and_deferred_and_requeue(tern, smtp_sink):
    sink = smtp_sink(start=False)
    server = tern(relayhost=sink.nexthop, minimal_backoff_time="1h", maximal_backoff_time="1h",
                  queue_run_delay="1s")
    first, second, third = (deferred(server, subject=f"m{i}") for i in range(3))
    deleted = queue(server, "delete", first)
    assert (deleted.returncode, deleted.stderr) == (0, "tern: Deleted: 1 message\n")
    server.wait_log(f"{first}: removed")
    assert first not in queue(server, "list").stdout
    sink.start()
    assert queue(server, "requeue", second).returncode == 0
    server.wait_log(f"{second}: requeued")
    server.wait_log(f"{second}: to=<b@example.net>, relay=127.0.0.1", timeout=10)
    assert [subject(m) for m in sink.wait_messages(1)] == ["m1"]
    assert queue(server, "delete", "--deferred").returncode == 0
    server.wait_log(f"{third}: removed")
    assert "Mail queue is empty" in queue(server, "list").stdout


def test_show_summary_and_json_of_a_queued_message(tern, smtp_sink):
    sink = smtp_sink(start=False)
    # no retry while the test runs: the message stays deferred, never active
    server = tern(relayhost=sink.nexthop, minimal_backoff_time="1h", maximal_backoff_time="1h",
                  queue_run_delay="1s")
    queue_id = deferred(server, recipients=("b@example.net", "c@example.com"), subject="shown")
    shown = queue(server, "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.startswith(f"*** ENVELOPE RECORDS deferred/{queue_id} ***\n")
    assert "sender: a@example.org\n" in text and "recipient: c@example.com\n" in text
    assert re.search(r"status: deferred, attempts: \d+, dsn: 4\.4\.1", text)
    assert "    reason: connect to 127.0.0.1[127.0.0.1]:" in text
    assert f"*** MESSAGE CONTENTS deferred/{queue_id} ***\nReceived: from " in text
    assert "\nSubject: shown\n" in text and "\n\nbody of shown\n*** MESSAGE FILE END" in text
    as_json = json.loads(queue(server, "show", queue_id, "--json").stdout)
    assert as_json["body"] == "body of shown\r\n" and "Subject: shown\r\n" in as_json["headers"]
    (listed_item,) = map(json.loads, queue(server, "list", "--json").stdout.splitlines())
    assert listed_item["queue_name"] == "deferred" and listed_item["queue_id"] == queue_id
    table = queue(server, "summary").stdout.splitlines()
    assert table[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                "1280+"]
    assert table[1].split() == ["TOTAL", "2", "2"] + ["0"] * 9
    assert sorted(line.split()[0] for line in table[2:]) == ["example.com", "example.net"]
    summary = json.loads(queue(server, "summary", "--json").stdout)
    assert summary["total"]["total"] == 2
    assert {row["domain"] for row in summary["domains"]} == {"example.com", "example.net"}
    missing = queue(server, "hold", "NoSuchId0")
    assert (missing.returncode, missing.stderr) == (1, "tern: NoSuchId0: no such message\n")


def test_offline_changes_are_honoured_by_the_next_start(tern, smtp_sink):
    sink = smtp_sink(start=False)
    server = tern(relayhost=sink.nexthop, **FAST)
    kept, dropped, freed = (deferred(server, subject=f"m{i}") for i in range(3))
    server.stop()
    assert not list((server.directory / "spool").glob("control*"))
    ok(server, "hold", kept, freed)
    ok(server, "delete", dropped)
    ok(server, "release", freed)
    listing = queue(server, "list").stdout
    assert f"{kept}!" in listing and dropped not in listing and f"{freed}!" not in listing
    sink.start()
    server.start()
    server.wait_log(f"{freed}: removed", timeout=20)
    assert [subject(m) for m in sink.wait_messages(1)] == ["m2"]
    time.sleep(3.5)  # past the longest backoff and a queue run: the held one stays
    assert len(sink.messages()) == 1
    assert f"{kept}!" in queue(server, "list").stdout
    log = server.log()
    for line in [f"{kept}: placed on hold", f"{dropped}: removed", f"{freed}: released"]:
        assert line in log


def test_a_message_being_delivered_is_in_the_active_queue(tern, smtp_sink):
    sink = smtp_sink("-w", "4")  # waits 4 s before answering DATA: the delivery takes that long
    server = tern(relayhost=sink.nexthop)
    queue_id = send(server, "a@example.org", ["b@example.net"], b"Subject: slow\r\n\r\nbody\r\n")
    started = time.monotonic()
    listing = ok(server, "list")
    (item,) = map(json.loads, ok(server, "list", "--json").splitlines())
    shown = ok(server, "show", queue_id, "--envelope")
    active = json.loads(ok(server, "summary", "active", "--json"))["total"]["total"]
    deferred = json.loads(ok(server, "summary", "deferred", "--json"))["total"]["total"]
    assert time.monotonic() - started < 4, "too slow: the delivery may have ended meanwhile"
    assert f"\n{queue_id}* " in listing  # mailq: * after the ID of an active message
    assert (item["queue_name"], [r["address"] for r in item["recipients"]]) == (
        "active", ["b@example.net"])
    assert shown.startswith(f"*** ENVELOPE RECORDS active/{queue_id} ***\n")
    assert (active, deferred) == (1, 0)
    server.wait_log(f"{queue_id}: removed")
    assert len(sink.wait_messages(1)) == 1
    assert ok(server, "list") == "Mail queue is empty\n"
