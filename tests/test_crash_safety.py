"""The durability contract under load, against real processes: smtplib clients in threads →
``tern serve`` → smtp-sink. Tern is killed (SIGKILL) at random moments, or stopped (SIGTERM), and
restarted; clients resend what did not get 250. Every message that got 250 must arrive; a message
may arrive twice only if it was in flight at a kill; nothing else may arrive."""

import contextlib
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter, deque

SEED = 20240605  # fixed: the same kill points on every run
SENDER, RECIPIENT = "load@example.org", "sink@example.net"
QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)")
SUBJECT = re.compile(rb"^Subject: (load-\d+-\d+)\r?$", re.MULTILINE)
RECEIVED_ID = re.compile(rb"\swith E?SMTPS?A? id (\w+)")
LOG_LINE = re.compile(r"tern/(\w+)\[(\d+)\]: (\w+): (.*)$", re.MULTILINE)


def body(subject: str) -> bytes:
    return (f"Subject: {subject}\r\nMessage-ID: <{subject}@load.test>\r\n\r\n".encode()
            + b"The quick brown fox jumps over the lazy dog.\r\n" * 20)


class Load:
    """``clients`` threads, each sending ``per_client`` numbered messages over one connection
    (reconnecting when it is lost) until each got 250, or until ``deadline``."""

    def __init__(self, server, *, clients: int, per_client: int, deadline: float) -> None:
        self.server = server
        self.deadline = deadline
        self.total = clients * per_client
        self.accepted: dict[str, str] = {}  # subject → queue ID of its 250
        self.replies: Counter = Counter()  # every final DATA reply code, and "lost" connections
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, daemon=True,
                             args=([f"load-{c}-{i}" for i in range(per_client)],))
            for c in range(clients)
        ]

    def start(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self._threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 15)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def wait_count(self, count: int) -> None:
        while self.count < count and time.monotonic() < self.deadline:
            time.sleep(0.005)

    def _client(self, subjects: list[str]) -> None:
        pending = deque(subjects)
        client: smtplib.SMTP | None = None
        while pending and time.monotonic() < self.deadline:
            try:
                if client is None:
                    client = smtplib.SMTP(*self.server.address, timeout=10)
                    client.ehlo("load.test")
                code, reply = self._send(client, pending[0])
            except (smtplib.SMTPException, OSError):
                # Lost (a kill, a shutdown): whether the message was queued is unknown; it did
                # not get 250, so it is sent again.
                self._count("lost")
                client = self._drop(client)
                time.sleep(0.05)
                continue
            self._count(code)
            if code == 250:
                with self._lock:
                    self.accepted[pending.popleft()] = QUEUED.search(reply).group(1)
            elif code == 421:
                client = self._drop(client)
            else:
                time.sleep(0.05)  # 4xx: try again
        self._drop(client)

    @staticmethod
    def _send(client: smtplib.SMTP, subject: str) -> tuple[int, str]:
        for code, reply in (client.mail(SENDER), client.rcpt(RECIPIENT)):
            if code != 250:
                return code, reply.decode()
        code, reply = client.data(body(subject))
        return code, reply.decode()

    @staticmethod
    def _drop(client: smtplib.SMTP | None) -> None:
        if client is not None:
            with contextlib.suppress(OSError):
                client.close()

    def _count(self, what) -> None:
        with self._lock:
            self.replies[what] += 1


def in_flight(log: str, pid: int) -> set[str]:
    """Queue IDs in flight when process ``pid`` died: queued and not yet removed (from the whole
    maillog), or in a transaction of that process that had not been answered (it may have been
    committed just before the kill, not yet logged)."""
    queued, removed, begun, answered = set(), set(), set(), set()
    for service, line_pid, queue_id, text in LOG_LINE.findall(log):
        if text.startswith("message-id=") or text.endswith("(queue active)"):
            queued.add(queue_id)  # (a kill between commit and cleanup's line leaves only qmgr's)
        elif text == "removed":
            removed.add(queue_id)
        elif int(line_pid) == pid and service == "smtpd":
            (begun if text.startswith("client=") else answered).add(queue_id)
    return (queued - removed) | (begun - answered - queued)


def wait_queue_empty(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = server.tern("queue", "list", "--config", str(server.config_file)).stdout
        if "Mail queue is empty" in listing:
            return
        time.sleep(0.3)
    raise AssertionError(f"the queue did not empty:\n{listing}")


def check_delivery(load: Load, sink, server, in_flight_at_stops: Counter) -> Counter:
    """Every message that got 250 arrives and nothing else does; each queue ID arrives at most
    once plus once for every stop at which it was in flight (``in_flight_at_stops``), and a queue
    ID whose 250 never reached the client only for those. Returns arrivals by queue ID."""
    assert load.count == load.total, (
        f"only {load.count} of {load.total} messages got 250 in time; replies: {load.replies}")
    wait_queue_empty(server)
    subjects: Counter = Counter()
    arrivals: Counter = Counter()  # queue ID (from our Received: header) → copies
    for message in sink.wait_messages(load.total, timeout=10):
        subject, queue_id = SUBJECT.search(message.content), RECEIVED_ID.search(message.content)
        assert subject and queue_id, f"not one of ours: {message.content[:300]!r}"
        subjects[subject.group(1).decode()] += 1
        arrivals[queue_id.group(1).decode()] += 1
    missing = set(load.accepted) - set(subjects)
    assert not missing, f"{len(missing)} messages got 250 and never arrived: {sorted(missing)[:10]}"
    unexpected = set(subjects) - set(load.accepted)
    assert not unexpected, f"arrived without a 250: {sorted(unexpected)[:10]}"
    acknowledged = set(load.accepted.values())
    too_many = {queue_id: copies for queue_id, copies in arrivals.items()
                if copies > (queue_id in acknowledged) + in_flight_at_stops[queue_id]}
    log = server.log()
    assert not too_many, f"more copies than kills in flight explain: {too_many}\n" + "\n".join(
        line for line in log.splitlines() if any(queue_id in line for queue_id in too_many))
    return arrivals


def start_tern(tern, sink):
    # one process: in_flight() reads the lines of the pid that was killed or stopped
    return tern(relayhost=sink.nexthop, minimal_backoff_time="1s", maximal_backoff_time="2s",
                queue_run_delay="1s", smtpd_timeout="20s", worker_count=1)


def test_sigkill_under_load_loses_nothing_that_got_250(tern, smtp_sink):
    sink = smtp_sink()
    server = start_tern(tern, sink)
    load = Load(server, clients=20, per_client=100, deadline=time.monotonic() + 40).start()
    rng = random.Random(SEED)
    kill_points = sorted(rng.sample(range(load.total // 10, load.total * 9 // 10),
                                    rng.randint(3, 5)))
    in_flight_at_kills: Counter = Counter()
    for point in kill_points:
        load.wait_count(point)
        time.sleep(rng.uniform(0, 0.05))
        pid = server.process.pid
        server.stop(signal.SIGKILL)
        in_flight_at_kills.update(in_flight(server.log(), pid))
        server.start()
    load.join()
    arrivals = check_delivery(load, sink, server, in_flight_at_kills)
    print(f"{len(kill_points)} kills at {kill_points}: {in_flight_at_kills.total()} in flight, "
          f"{arrivals.total() - load.total} duplicates; replies {dict(load.replies)}")


def test_sigterm_under_load_is_graceful_and_loses_nothing(tern, smtp_sink):
    sink = smtp_sink()
    server = start_tern(tern, sink)
    load = Load(server, clients=10, per_client=60, deadline=time.monotonic() + 30).start()
    load.wait_count(load.total // 3)
    pid = server.process.pid
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    in_flight_at_stop = Counter(in_flight(log, pid))
    lines = [line for line in log.splitlines() if f"[{pid}]: " in line]
    stop = next(i for i, line in enumerate(lines) if "terminating on signal" in line)
    assert not [line for line in lines[stop:] if "]: connect from " in line]  # no new clients
    server.start()
    load.join()
    check_delivery(load, sink, server, in_flight_at_stop)
