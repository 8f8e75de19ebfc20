"""`tern serve` with several workers (engine.supervisor): a real server of two workers, each on
its own spool shard, smtp-sink as the next hop. Intake spreads over both shards; a killed worker
is restarted and delivers what its shard held; `tern queue` sees and changes both shards;
SIGTERM stops the supervisor and its workers."""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_end_to_end import send

FAST = {"minimal_backoff_time": "1s", "maximal_backoff_time": "2s", "queue_run_delay": "1s"}


def workers(server) -> list[int]:
    """The supervisor's child processes (its workers)."""
    pid = server.process.pid
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(item) for item in text.split())


def wait_workers(server, count: int = 2, exclude=(), timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = workers(server)
        if len(pids) == count and not set(pids) & set(exclude):
            return pids
        time.sleep(0.05)
    raise AssertionError(f"workers {workers(server)}, wanted {count} not in {exclude}")


def send_many(server, count: int, subject: str = "m") -> list[str]:
    """``count`` messages at once, each over its own connection; their queue IDs."""
    def one(i: int) -> str:
        return send(server, "a@example.org", ["b@example.net"],
                    f"Subject: {subject}{i}\r\n\r\nbody {i}\r\n".encode())

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def shard_of(queue_id: str) -> int:
    return int(queue_id[-1])  # the shard's letter ends the ID: 0, 1, …


def both_shards(server, subject: str = "m") -> list[str]:
    """Messages sent until both shards hold some."""
    queue_ids: list[str] = []
    for _ in range(5):
        queue_ids += send_many(server, 10, subject=f"{subject}{len(queue_ids)}-")
        if {shard_of(queue_id) for queue_id in queue_ids} == {0, 1}:
            return queue_ids
    raise AssertionError(f"all mail went to one shard: {queue_ids}")


def deferred_on_both_shards(tern, smtp_sink):
    """A 2-worker server whose next hop is down, with deferred mail in both shards."""
    sink = smtp_sink(start=False)
    server = tern(relayhost=sink.nexthop, worker_count=2, **FAST)
    pids = wait_workers(server)
    queue_ids = both_shards(server)
    for queue_id in queue_ids:
        server.wait_log(f"{queue_id}: to=<b@example.net>")  # deferred: the next hop is down
    return sink, server, pids, queue_ids


def queue(server, *args: str):
    return server.tern("queue", *args, "--config", str(server.config_file))


def test_mail_spreads_over_both_shards_is_all_delivered_and_sigterm_stops_all(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop, worker_count=2)
    pids = wait_workers(server)
    queue_ids = both_shards(server)
    assert len(set(queue_ids)) == len(queue_ids)
    spool = server.directory / "spool"
    assert (spool / "shard0" / "data.mdb").exists() and (spool / "shard1" / "data.mdb").exists()
    log = server.wait_log(": removed", count=len(queue_ids), timeout=30)
    assert all(f"{queue_id}: removed" in log for queue_id in queue_ids)
    assert len(sink.wait_messages(len(queue_ids), timeout=10)) == len(queue_ids)
    # each worker logs the mail of its own shard, under its own pid
    for queue_id in queue_ids:
        (pid,) = set(re.findall(rf"tern/smtpd\[(\d+)\]: {queue_id}: client=", log))
        assert int(pid) == pids[0] or int(pid) == pids[1]
    by_pid = {pid: {shard_of(queue_id) for queue_id in queue_ids
                    if f"tern/smtpd[{pid}]: {queue_id}: client=" in log} for pid in pids}
    assert sorted(map(tuple, by_pid.values())) == [(0,), (1,)]
    supervisor = server.process.pid
    assert f"tern/master[{supervisor}]: daemon started -- " in log and ", 2 workers" in log

    assert server.stop(signal.SIGTERM) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    log = server.log()
    assert f"tern/master[{supervisor}]: terminating on signal" in log
    assert "warning: process" not in log  # the workers stopped as asked, none died
    assert not list(spool.glob("control*"))  # each worker removed its control socket


def test_a_killed_worker_is_restarted_and_delivers_its_shard(tern, smtp_sink):
    sink, server, _, queue_ids = deferred_on_both_shards(tern, smtp_sink)
    victim = next(queue_id for queue_id in queue_ids if shard_of(queue_id) == 1)
    (pid,) = map(int, re.findall(rf"tern/smtpd\[(\d+)\]: {victim}: client=", server.log()))
    os.kill(pid, signal.SIGKILL)
    server.wait_log(f"tern/master[{server.process.pid}]: warning: process tern/worker1 pid {pid} "
                    f"killed by signal 9")
    wait_workers(server, exclude=[pid])
    sink.start()
    log = server.wait_log(": removed", count=len(queue_ids), timeout=30)
    assert all(f"{queue_id}: removed" in log for queue_id in queue_ids)
    sent = re.search(rf"tern/smtp\[(\d+)\]: {victim}: to=<b@example.net>, .*status=sent", log)
    assert sent is not None and int(sent.group(1)) != pid  # by the new worker
    subjects = {re.search(rb"Subject: (\S+)", m.content).group(1)
                for m in sink.wait_messages(len(queue_ids), timeout=10)}
    assert len(subjects) == len(queue_ids)
    assert server.stop(signal.SIGTERM) == 0


def test_queue_commands_see_and_change_both_shards(tern, smtp_sink):
    sink, server, pids, queue_ids = deferred_on_both_shards(tern, smtp_sink)
    listing = queue(server, "list").stdout
    assert all(re.search(rf"^{queue_id}[*!]? ", listing, re.MULTILINE) for queue_id in queue_ids)

    held = queue(server, "hold", "ALL")
    assert (held.returncode, held.stderr) == (
        0, f"tern: Placed on hold: {len(queue_ids)} messages\n")
    log = server.log()
    for queue_id in queue_ids:  # done by the worker that owns the message
        (pid,) = map(int, re.findall(rf"tern/smtpd\[(\d+)\]: {queue_id}: client=", log))
        server.wait_log(f"tern/postsuper[{pid}]: {queue_id}: placed on hold")
    assert {int(pid) for pid in re.findall(r"tern/postsuper\[(\d+)\]", server.log())} == set(pids)
    listing = queue(server, "list").stdout
    assert all(f"{queue_id}!" in listing for queue_id in queue_ids)

    sink.start()
    released = queue(server, "release", "ALL")
    assert (released.returncode, released.stderr) == (
        0, f"tern: Released from hold: {len(queue_ids)} messages\n")
    log = server.wait_log(": removed", count=len(queue_ids), timeout=30)
    assert all(f"{queue_id}: removed" in log for queue_id in queue_ids)
    assert len(sink.wait_messages(len(queue_ids), timeout=10)) == len(queue_ids)
    assert queue(server, "list").stdout == "Mail queue is empty\n"


def wait_gone(pids, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_workers_die_with_a_killed_supervisor_and_the_next_start_delivers(tern, smtp_sink):
    sink, server, pids, queue_ids = deferred_on_both_shards(tern, smtp_sink)
    server.stop(signal.SIGKILL)
    wait_gone(pids)  # no orphan keeps the port or a shard
    sink.start()
    server.start()  # same port, same spool
    log = server.wait_log(": removed", count=len(queue_ids), timeout=30)
    assert all(f"{queue_id}: removed" in log for queue_id in queue_ids)
    assert server.stop(signal.SIGTERM) == 0


def test_a_worker_that_cannot_start_is_one_fatal_line(tern):
    first = tern(worker_count=2)
    pids = wait_workers(first)
    second = tern(worker_count=2, queue_directory=str(first.directory / "spool"), start=False)
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--config",
                             str(second.config_file)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"tern: fatal: queue_directory {first.directory / 'spool'} "
                                    "is in use: another tern serve answers on ")
    assert result.stderr.count("\n") == 1
    assert workers(first) == pids  # the running server is untouched
