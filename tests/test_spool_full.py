"""A full spool: the LMDB map grows (as Postfix's slmdb.c) up to its limit; at the limit, or with
the disk full, new mail gets SpoolFull (452 4.3.1) while queued mail is kept, finished and then
makes room again. The last test runs a real ``tern serve`` on a tiny tmpfs."""

import asyncio
import os
import re
import smtplib
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from engine.spool import Envelope, QueuedMessage, Recipient, SpoolFull
from engine.spool.lmdb_spool import LmdbSpool

KIB, MIB = 1 << 10, 1 << 20
QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)")


def message(queue_id: str, size: int) -> QueuedMessage:
    body = f"Subject: {queue_id}\r\n\r\n".encode() + os.urandom(size // 2).hex().encode()[:size]
    envelope = Envelope(queue_id=queue_id, sender="s@y.test", recipients=[Recipient("a@x.test")],
                        arrival=1.0, size=len(body))
    return QueuedMessage(envelope=envelope, content=[body])


async def fill(spool: LmdbSpool, size: int, *, batch: int = 10, most: int = 5000) -> list[str]:
    """Enqueue messages of ``size`` bytes, ``batch`` at a time, then one at a time, until not
    even one fits (SpoolFull); returns the queue IDs stored. Fails after ``most`` messages."""
    stored: list[str] = []
    while len(stored) < most:
        ids = [f"Q{len(stored) + i:06d}" for i in range(batch)]
        results = await asyncio.gather(*(spool.enqueue(message(i, size)) for i in ids),
                                       return_exceptions=True)
        stored += [i for i, result in zip(ids, results, strict=True) if result is None]
        if any(isinstance(result, SpoolFull) for result in results):
            if batch == 1:
                return stored
            batch = 1  # a whole batch did not fit: perhaps a single message still does
            continue
        assert all(result is None for result in results), results
    raise AssertionError(f"no SpoolFull after {most} messages")


def test_a_small_map_grows_transparently(tmp_path):
    async def scenario():
        spool = LmdbSpool(tmp_path / "s", map_size=256 * KIB, map_size_limit=64 * MIB)
        ids = [f"Q{i:04d}" for i in range(400)]
        for start in range(0, len(ids), 40):
            await asyncio.gather(*(spool.enqueue(message(i, 10 * KIB)) for i in ids[start:]
                                   [:40]))
        await spool.enqueue(message("HUGE", 3 * MIB))  # needs several doublings at once
        grown_to = spool.map_size
        spool.close()
        return ids, grown_to

    ids, grown_to = asyncio.run(scenario())
    assert 4 * MIB < grown_to <= 64 * MIB
    spool = LmdbSpool(tmp_path / "s", map_size=256 * KIB)  # reopens with the space in use
    try:
        assert [e.queue_id for e in spool.envelopes()] == ["HUGE", *ids]
        assert all(spool.content(i).startswith(f"Subject: {i}\r\n".encode()) for i in ids)
    finally:
        spool.close()


def test_at_the_limit_new_mail_is_refused_and_removals_make_room_again(tmp_path):
    async def scenario():
        spool = LmdbSpool(tmp_path / "s", map_size=256 * KIB, map_size_limit=2 * MIB)
        stored = await fill(spool, 8 * KIB)
        assert spool.map_size == 2 * MIB
        with pytest.raises(SpoolFull):
            await spool.enqueue(message("REFUSED", 8 * KIB))
        assert spool.envelope("REFUSED") is None
        for queue_id in stored:  # intact and readable
            assert spool.content(queue_id).startswith(f"Subject: {queue_id}\r\n".encode())
        # queued mail is still updated and removed, in the same batches as refused new mail
        first = spool.envelope(stored[0])
        first.recipients[0].status = "deferred"
        results = await asyncio.gather(
            spool.update(first), *(spool.remove(i) for i in stored[1:21]),
            spool.enqueue(message("ALSO-REFUSED", 64 * KIB)), return_exceptions=True)
        assert results[:-1] == [None] * 21 and isinstance(results[-1], SpoolFull)
        assert spool.envelope(stored[0]).recipients[0].status == "deferred"
        await spool.remove(stored[21])  # pages freed a commit ago are reusable now
        await spool.enqueue(message("AFTER", 8 * KIB))  # intake resumed
        left = {e.queue_id for e in spool.envelopes()}
        spool.close()
        return stored, left

    stored, left = asyncio.run(scenario())
    assert left == {stored[0], *stored[22:], "AFTER"}


def test_a_full_map_still_takes_a_large_batch_of_scattered_updates_and_removals(tmp_path):
    """Removing scattered messages rewrites many B-tree pages: at the limit they get headroom."""
    async def scenario():
        spool = LmdbSpool(tmp_path / "s", map_size=1 * MIB, map_size_limit=4 * MIB)
        stored = await fill(spool, 600, batch=40)
        envelopes = [spool.envelope(i) for i in stored[1::3]]
        for envelope in envelopes:
            envelope.recipients[0].status = "deferred"
            envelope.recipients[0].last_reply = "451 4.3.0 try again later, a longer reason"
        changes = [*(spool.update(e) for e in envelopes), *(spool.remove(i) for i in stored[::3])]
        results = await asyncio.gather(*changes, return_exceptions=True)
        with pytest.raises(SpoolFull):  # the headroom is not for new mail
            await spool.enqueue(message("NEW", 64 * KIB))
        left = spool.envelopes()
        spool.close()
        return stored, results, left

    stored, results, left = asyncio.run(scenario())
    assert len(stored) > 1000
    assert results == [None] * len(results)
    assert {e.queue_id for e in left} == set(stored) - set(stored[::3])
    assert all(e.recipients[0].status == "deferred" for e in left if e.queue_id in stored[1::3])


def test_reads_on_another_thread_are_safe_while_the_map_grows(tmp_path):
    """LMDB may resize only while this process has no transaction open: readers wait."""
    spool = LmdbSpool(tmp_path / "s", map_size=64 * KIB, map_size_limit=256 * MIB,
                      commit_window=0)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def reader():
        nonlocal reads
        while not stop.is_set():
            try:
                for envelope in spool.envelopes()[-5:]:
                    assert spool.content(envelope.queue_id).startswith(b"Subject: ")
                reads += 1
            except BaseException as error:  # noqa: BLE001 - reported by the test
                errors.append(error)
                return

    async def writer():
        for i in range(300):
            await spool.enqueue(message(f"Q{i:04d}", 48 * KIB))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        asyncio.run(asyncio.wait_for(writer(), 60))
    finally:
        stop.set()
        thread.join(10)
        grown_to = spool.map_size
        spool.close()
    assert errors == []
    assert reads > 0 and grown_to >= 16 * MIB


def test_a_read_only_reader_adopts_a_map_grown_by_the_server(tmp_path):
    """`tern queue list` opens the spool while the server writes: it follows the server's growth."""
    async def enqueue(spool, first, count):
        for i in range(first, first + count):
            await spool.enqueue(message(f"Q{i:04d}", 32 * KIB))

    spool = LmdbSpool(tmp_path / "s", map_size=128 * KIB, map_size_limit=64 * MIB)
    try:
        asyncio.run(enqueue(spool, 0, 2))
        script = textwrap.dedent(f"""
            import sys
            from engine.spool.lmdb_spool import LmdbSpool
            spool = LmdbSpool({str(tmp_path / "s")!r}, map_size=128 * 1024, readonly=True)
            print(len(spool.envelopes()), flush=True)
            sys.stdin.readline()  # the server grows the map meanwhile
            print(len(spool.envelopes()), len(spool.content("Q0099")), flush=True)
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().split() == ["2"]
            asyncio.run(enqueue(spool, 2, 98))
            out, err = child.communicate("go\n", timeout=30)
        finally:
            child.kill()
        assert spool.map_size >= 2 * MIB
    finally:
        spool.close()
    assert child.returncode == 0, err
    count, size = out.split()
    assert count == "100" and int(size) > 32 * KIB


# ---- a small file system --------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """Factory: ``small_filesystem(size)`` mounts a tmpfs of ``size`` bytes and returns its
    path; unmounted afterwards. Skips where mounting is not permitted (not root, no
    CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size: int):
        directory = tmp_path / f"fs{len(mounted)}"
        directory.mkdir()
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                     str(directory)], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"cannot mount a tmpfs to fill: {error}")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root): {result.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in mounted:
        for _ in range(50):  # a tern process may still be going away
            if subprocess.run(["umount", str(directory)], capture_output=True,
                              timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=10)


def test_a_full_disk_refuses_new_mail_and_keeps_queued_mail_moving(small_filesystem):
    directory = small_filesystem(1 * MIB)

    async def scenario():
        spool = LmdbSpool(directory / "s", map_size=64 * MIB)  # the disk fills, not the map
        stored = await fill(spool, 16 * KIB)
        with pytest.raises(SpoolFull, match="no space"):
            await spool.enqueue(message("REFUSED", 16 * KIB))
        assert all(spool.content(i).startswith(f"Subject: {i}\r\n".encode()) for i in stored)
        for queue_id in stored[:10]:
            await spool.remove(queue_id)
        await spool.enqueue(message("AFTER", 16 * KIB))
        left = {e.queue_id for e in spool.envelopes()}
        spool.close()
        return stored, left

    stored, left = asyncio.run(scenario())
    assert len(stored) > 10
    assert left == {*stored[10:], "AFTER"}


def try_send(client: smtplib.SMTP, subject: str, size: int) -> tuple[int, str]:
    body = f"Subject: {subject}\r\n\r\n".encode() + b"x" * size + b"\r\n"
    client.mail("a@example.org")
    client.rcpt("b@example.net")
    code, reply = client.data(body)
    return code, reply.decode()


def test_server_on_a_full_disk_answers_452_keeps_running_and_delivers_what_it_took(
        small_filesystem, tern, smtp_sink):  # in this order: tern stops before the unmount
    queue = small_filesystem(4 * MIB)
    sink = smtp_sink(start=False)
    # one process: pages freed in one shard's file are room for that shard only, and the last
    # connection may reach another worker, whose shard cannot grow on the still-full disk
    server = tern(relayhost=sink.nexthop, queue_directory=str(queue), queue_map_size=1 * MIB,
                  queue_map_size_limit=1 << 30, minimal_backoff_time="1s",
                  maximal_backoff_time="1s", queue_run_delay="1s", worker_count=1)
    accepted: dict[str, str] = {}  # subject → queue ID
    with smtplib.SMTP(*server.address, timeout=30) as client:
        client.ehlo("client.test")
        for i in range(200):  # 4 MB of tmpfs hold at most ~40 messages of 100 kB
            code, reply = try_send(client, f"fill {i}", 100 * KIB)
            if code != 250:
                break
            accepted[f"fill {i}"] = QUEUED.search(reply).group(1)
        assert (code, reply) == (452, "4.3.1 Insufficient system storage"), (i, code, reply)
        assert client.noop()[0] == 250  # the session goes on
    assert 5 <= len(accepted) < 200
    assert len(accepted) * 100 * KIB > 2 * MIB  # the map grew: the disk filled, not the map
    with smtplib.SMTP(*server.address, timeout=10) as client:  # the server too
        assert client.ehlo("client.test")[0] == 250
    assert server.process.poll() is None
    listing = server.tern("queue", "list", "--config", str(server.config_file)).stdout
    assert set(accepted.values()) <= set(re.findall(r"^(\w+)[*!]?\s", listing, re.MULTILINE))

    sink.start()
    log = server.wait_log(": removed", count=len(accepted), timeout=40)
    assert all(f"{queue_id}: removed" in log for queue_id in accepted.values())
    delivered = [re.search(rb"Subject: (fill \d+)", m.content).group(1).decode()
                 for m in sink.wait_messages(len(accepted), timeout=10)]
    assert set(delivered) == set(accepted)  # every message that got 250 (duplicates allowed)
    with smtplib.SMTP(*server.address, timeout=10) as client:  # room again: intake resumed
        client.ehlo("client.test")
        assert try_send(client, "after", 100 * KIB)[0] == 250
