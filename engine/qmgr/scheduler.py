"""The queue manager's per-destination decisions as pure logic: what may start, and when.

No I/O and no clock: callers pass ``now``. Due work becomes jobs (one message, one next hop, at
most ``recipient_limit`` recipients) in per-destination FIFOs, started round robin across
destinations. Each destination has Postfix's concurrency window: it starts at the initial
concurrency, grows with each success up to the limit, shrinks with each site failure; a
destination whose whole cohort(s) failed (``failed_cohort_limit`` times the window it had when
the run of failures began) is dead (suspended) until its backoff ends. ``rate_delay`` spaces
deliveries to one destination (and then allows one at a time). A destination nobody needs (no
job queued or running, not dead, its rate delay over) is forgotten, failure count included:
memory is bounded by the busy and the dead, and ``sweep`` frees the dead whose time is over.
"""

from collections import deque
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class Destination:
    """One transport + next hop: its queue of jobs and its feedback state."""

    name: str
    window: float  # current concurrency limit (slow start), fractional between changes
    queue: deque = field(default_factory=deque)
    active: int = 0
    failures: int = 0  # site failures since the last success
    cohort: int = 0  # int(window) when the first of those failures came (at least 1)
    dead_until: float = 0.0
    next_start: float = 0.0  # rate delay: the earliest time the next delivery may start
    last_failure: str = ""  # the reason a dead destination gives its deferred jobs


class Scheduler:
    def __init__(self, concurrency_limit: int = 20, *, initial_concurrency: int = 5,
                 failed_cohort_limit: int = 1, rate_delay: float = 0.0) -> None:
        self.concurrency_limit = max(1, concurrency_limit)
        self.initial_concurrency = max(1, min(initial_concurrency, self.concurrency_limit))
        self.failed_cohort_limit = max(1, failed_cohort_limit)
        self.rate_delay = rate_delay
        self._destinations: dict[str, Destination] = {}
        self._round: deque[str] = deque()  # destinations with queued jobs, in turn order

    def _destination(self, name: str) -> Destination:
        found = self._destinations.get(name)
        if found is None:
            found = self._destinations[name] = Destination(name, float(self.initial_concurrency))
        return found

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> bool:
        """Queue a job; False (not queued) when its destination is dead: defer it."""
        destination = self._destination(job.destination)
        if destination.dead_until > now:
            return False
        if not destination.queue:
            self._round.append(destination.name)
        destination.queue.append(job)
        return True

    def startable(self, now: float) -> list[Job]:
        """Jobs that may start now: one per destination per turn, round robin, each destination
        held to its window (and to one at a time, spaced, under a rate delay)."""
        started = []
        progressed = True
        while progressed and self._round:
            progressed = False
            for _ in range(len(self._round)):
                destination = self._destinations[self._round[0]]
                if not self._may_start(destination, now):
                    self._round.rotate(-1)
                    continue
                started.append(destination.queue.popleft())
                destination.active += 1
                if self.rate_delay > 0:
                    destination.next_start = now + self.rate_delay
                progressed = True
                if destination.queue:
                    self._round.rotate(-1)
                else:
                    self._round.popleft()
        return started

    def _may_start(self, destination: Destination, now: float) -> bool:
        if self.rate_delay > 0:
            return destination.active == 0 and destination.next_start <= now
        return destination.active < int(destination.window)

    def finished(self, job: Job, now: float, *, site_failure: str | None = None,
                 retry_after: float = 0.0) -> list[Job]:
        """A job ended. ``site_failure`` (the reason) when the destination itself failed
        (connection, greeting): negative feedback. Returns the queued jobs to defer when this
        failure made the destination dead (suspended for ``retry_after`` seconds)."""
        destination = self._destinations[job.destination]
        destination.active -= 1
        if site_failure is None:
            destination.failures = 0
            destination.window = min(float(self.concurrency_limit),
                                     destination.window + 1.0 / destination.window)
            self._forget_if_idle(destination, now)
            return []
        if destination.failures == 0:  # a cohort is the window as it was before the failures
            destination.cohort = max(1, int(destination.window))
        destination.failures += 1
        destination.last_failure = site_failure
        destination.window = max(1.0, destination.window - 1.0 / destination.window)
        if destination.failures < destination.cohort * self.failed_cohort_limit:
            self._forget_if_idle(destination, now)
            return []
        destination.dead_until = now + retry_after
        destination.failures = 0
        destination.window = float(self.initial_concurrency)
        dropped = list(destination.queue)
        destination.queue.clear()
        if destination.name in self._round:
            self._round.remove(destination.name)
        self._forget_if_idle(destination, now)  # dead for retry_after <= 0 is not dead
        return dropped

    def sweep(self, now: float) -> None:
        """Forget every destination nobody needs any more, the dead whose backoff has ended
        included (the queue manager calls this at each queue scan)."""
        for destination in list(self._destinations.values()):
            self._forget_if_idle(destination, now)

    def _forget_if_idle(self, destination: Destination, now: float) -> None:
        """Keep memory bounded by the busy and the dead: drop the state of a destination with
        no job queued or running, not dead, and its rate delay over (a new one reads the same,
        but for a failure count and a shrunk window, which are let go)."""
        if (not destination.queue and not destination.active and destination.dead_until <= now
                and destination.next_start <= now):
            del self._destinations[destination.name]

    # -- queries -----------------------------------------------------------------------------

    def remembered(self) -> int:
        """How many destinations the scheduler holds state for."""
        return len(self._destinations)

    def suspended_reason(self, name: str, now: float) -> str | None:
        destination = self._destinations.get(name)
        if destination is None or destination.dead_until <= now:
            return None
        return destination.last_failure

    def active(self, name: str) -> int:
        destination = self._destinations.get(name)
        return destination.active if destination else 0

    def window(self, name: str) -> float:
        destination = self._destinations.get(name)
        return destination.window if destination else float(self.initial_concurrency)

    def next_wakeup(self, now: float) -> float | None:
        """The earliest moment a rate-delayed destination with queued work may start again."""
        times = [self._destinations[name].next_start for name in self._round
                 if self._destinations[name].next_start > now]
        return min(times) if times else None
