"""The queue manager's decisions as pure logic: what is due, what may start, when to retry.

No I/O and no clock: callers pass ``now``. Messages wait in a due-time heap; due work becomes
jobs (one message, one next hop, at most ``recipient_limit`` recipients) in per-destination
FIFOs, started round robin across destinations within each destination's concurrency limit.
"""

import heapq
from collections import deque
from dataclasses import dataclass

from engine.delivery import NextHop


@dataclass(eq=False)
class Job:
    """One delivery attempt to make: a message's recipients that share a next hop."""

    queue_id: str
    nexthop: NextHop
    recipients: list[str]
    activated: float = 0.0  # when the message entered the active queue (for delays=a/b)

    @property
    def destination(self) -> str:
        return self.nexthop.destination


def backoff(attempts: int, minimal: float, maximal: float) -> float:
    """Seconds until the next attempt after ``attempts`` failures: minimal_backoff_time,
    doubling with each failure, capped at maximal_backoff_time (Postfix's schedule)."""
    if attempts <= 1:
        return min(minimal, maximal)
    return min(minimal * (2 ** min(attempts - 1, 32)), maximal)


def batches(recipients: list[str], limit: int) -> list[list[str]]:
    """Split recipients into transactions of at most ``limit`` (…_destination_recipient_limit)."""
    if limit <= 0:
        return [recipients]
    return [recipients[i : i + limit] for i in range(0, len(recipients), limit)]


class Scheduler:
    def __init__(self, concurrency_limit: int = 20) -> None:
        self.concurrency_limit = concurrency_limit
        self._waiting: list[tuple[float, int, str]] = []  # (due, sequence, queue_id)
        self._sequence = 0
        self._queues: dict[str, deque[Job]] = {}
        self._round: deque[str] = deque()  # destinations with queued jobs, in turn order
        self._active: dict[str, int] = {}

    # -- messages waiting for their time -----------------------------------------------------

    def wait(self, queue_id: str, due: float) -> None:
        self._sequence += 1
        heapq.heappush(self._waiting, (due, self._sequence, queue_id))

    def due(self, now: float) -> list[str]:
        """Queue IDs whose time has come, earliest first (each returned once)."""
        ready = []
        while self._waiting and self._waiting[0][0] <= now:
            ready.append(heapq.heappop(self._waiting)[2])
        return ready

    def next_wakeup(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    # -- jobs and per-destination concurrency ------------------------------------------------

    def submit(self, job: Job) -> None:
        queue = self._queues.get(job.destination)
        if queue is None:
            queue = self._queues[job.destination] = deque()
            self._round.append(job.destination)
        queue.append(job)

    def startable(self) -> list[Job]:
        """Jobs that may start now: one per destination per turn, round robin, each
        destination held to its concurrency limit."""
        started = []
        progressed = True
        while progressed and self._round:
            progressed = False
            for _ in range(len(self._round)):
                destination = self._round[0]
                queue = self._queues[destination]
                if self._active.get(destination, 0) >= self.concurrency_limit:
                    self._round.rotate(-1)
                    continue
                started.append(queue.popleft())
                self._active[destination] = self._active.get(destination, 0) + 1
                progressed = True
                if queue:
                    self._round.rotate(-1)
                else:
                    self._round.popleft()
                    del self._queues[destination]
        return started

    def finished(self, job: Job) -> None:
        remaining = self._active[job.destination] - 1
        if remaining:
            self._active[job.destination] = remaining
        else:
            del self._active[job.destination]

    def active(self, destination: str) -> int:
        return self._active.get(destination, 0)
