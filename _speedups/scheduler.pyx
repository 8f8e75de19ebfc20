# cython: language_level=3
"""The queue manager's per-destination decisions: what may start, and when.

Compiled twin of ``engine/qmgr/scheduler.py`` (same class, same results; see engine.speedups).
Trusts its caller (the queue manager), as the twin does. Same state, laid out for C: a
destination's queue is a list with a consumed prefix, the round robin is a circular doubly
linked list of destinations (rotate, pop and remove are pointer moves), and ``startable``
remembers where each job started so that ``finished`` need not rebuild ``job.destination``
(a job's next hop does not change while it runs). A job finished that was not started here, or
whose destination was forgotten meanwhile, is looked up by name as in the twin. The feedback
arithmetic is the twin's, in doubles, operation for operation; times are doubles.
"""

from engine.qmgr.scheduler import Job, backoff, batches  # noqa: F401 - the same module API

cdef enum:
    COMPACT_ABOVE = 64  # a queue's consumed prefix longer than this is dropped once half of it


cdef class Destination:
    """One transport + next hop: its queue of jobs and its feedback state."""

    cdef readonly object name
    cdef readonly double window  # current concurrency limit (slow start)
    cdef list _queue  # jobs; _queue[:_head] already started (None)
    cdef Py_ssize_t _head
    cdef readonly long active
    cdef readonly long failures  # site failures since the last success
    cdef readonly long cohort  # <long>window when the first of those failures came (at least 1)
    cdef readonly double dead_until
    cdef readonly double next_start  # rate delay: the earliest time the next delivery may start
    cdef readonly object last_failure  # the reason a dead destination gives its deferred jobs
    cdef Destination _prev  # neighbours in the round robin while queued work waits
    cdef Destination _next
    cdef bint _forgotten  # dropped from Scheduler._destinations: jobs must look it up again

    def __cinit__(self, name, double window):
        self.name = name
        self.window = window
        self._queue = []
        self.last_failure = ""

    cdef inline bint _has_queue(self) noexcept:
        return self._head < len(self._queue)

    cdef inline object _pop(self):
        """The oldest queued job (the queue is not empty)."""
        cdef list queue = self._queue
        job = queue[self._head]
        queue[self._head] = None
        self._head += 1
        if self._head == len(queue):
            queue.clear()
            self._head = 0
        elif self._head > COMPACT_ABOVE and 2 * self._head > len(queue):
            del queue[:self._head]
            self._head = 0
        return job

    cdef inline list _drain(self):
        """All queued jobs, oldest first; the queue is left empty."""
        cdef list jobs = self._queue[self._head:]
        self._queue = []
        self._head = 0
        return jobs


cdef class Scheduler:
    """Per-destination FIFOs started round robin, each held to its slow-start window; dead
    destinations; rate delay. ``now`` is always passed in."""

    cdef public long concurrency_limit
    cdef public long initial_concurrency
    cdef public long failed_cohort_limit
    cdef public double rate_delay
    cdef dict _destinations  # name -> Destination
    cdef dict _running  # job started and not finished -> its Destination
    cdef Destination _round  # head of the round robin (deque[0] in the twin), or None
    cdef Py_ssize_t _round_length

    def __cinit__(self):
        self._destinations = {}
        self._running = {}

    def __init__(self, long concurrency_limit=20, *, long initial_concurrency=5,
                 long failed_cohort_limit=1, double rate_delay=0.0):
        self.concurrency_limit = max(1, concurrency_limit)
        self.initial_concurrency = max(1, min(initial_concurrency, self.concurrency_limit))
        self.failed_cohort_limit = max(1, failed_cohort_limit)
        self.rate_delay = rate_delay

    cdef Destination _destination(self, name):
        found = self._destinations.get(name)
        if found is None:
            found = Destination(name, <double>self.initial_concurrency)
            self._destinations[name] = found
        return <Destination>found

    # -- the round robin: a circular list; _round is its left end, _round._prev its right end --

    cdef inline void _round_append(self, Destination destination) noexcept:
        cdef Destination head = self._round
        if head is None:
            destination._prev = destination
            destination._next = destination
            self._round = destination
        else:
            destination._prev = head._prev
            destination._next = head
            head._prev._next = destination
            head._prev = destination
        self._round_length += 1

    cdef inline void _round_remove(self, Destination destination) noexcept:
        if destination._next is destination:
            self._round = None
        else:
            destination._prev._next = destination._next
            destination._next._prev = destination._prev
            if self._round is destination:
                self._round = destination._next
        destination._prev = None
        destination._next = None
        self._round_length -= 1

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, job, double now):
        """Queue a job; False (not queued) when its destination is dead: defer it."""
        cdef Destination destination = self._destination(job.destination)
        if destination.dead_until > now:
            return False
        if not destination._has_queue():
            self._round_append(destination)
        destination._queue.append(job)
        return True

    def startable(self, double now):
        """Jobs that may start now: one per destination per turn, round robin, each destination
        held to its window (and to one at a time, spaced, under a rate delay)."""
        cdef list started = []
        cdef dict running = self._running
        cdef double rate_delay = self.rate_delay
        cdef bint rated = rate_delay > 0
        cdef bint progressed = True
        cdef Py_ssize_t turn, turns
        cdef Destination destination
        while progressed and self._round_length:
            progressed = False
            turns = self._round_length
            for turn in range(turns):
                destination = self._round
                if rated:
                    if destination.active != 0 or not destination.next_start <= now:
                        self._round = destination._next
                        continue
                elif not destination.active < <long>destination.window:
                    self._round = destination._next
                    continue
                job = destination._pop()
                started.append(job)
                running[job] = destination
                destination.active += 1
                if rated:
                    destination.next_start = now + rate_delay
                progressed = True
                if destination._has_queue():
                    self._round = destination._next
                else:
                    self._round_remove(destination)
        return started

    def finished(self, job, double now, *, site_failure=None, double retry_after=0.0):
        """A job ended. ``site_failure`` (the reason) when the destination itself failed
        (connection, greeting): negative feedback. Returns the queued jobs to defer when this
        failure made the destination dead (suspended for ``retry_after`` seconds)."""
        cdef Destination destination = self._running.pop(job, None)
        cdef double window, limit
        if destination is None or destination._forgotten:
            destination = self._destinations[job.destination]
        destination.active -= 1
        if site_failure is None:
            destination.failures = 0
            limit = <double>self.concurrency_limit
            window = destination.window + 1.0 / destination.window
            destination.window = window if window < limit else limit  # min(limit, window)
            self._forget_if_idle(destination, now)
            return []
        if destination.failures == 0:  # a cohort is the window as it was before the failures
            destination.cohort = <long>destination.window
            if destination.cohort < 1:
                destination.cohort = 1
        destination.failures += 1
        destination.last_failure = site_failure
        window = destination.window - 1.0 / destination.window
        destination.window = window if window > 1.0 else 1.0  # max(1.0, window)
        # failures < cohort * failed_cohort_limit, without overflow (failures, cohort >= 1)
        if destination.failures // destination.cohort < self.failed_cohort_limit:
            self._forget_if_idle(destination, now)
            return []
        destination.dead_until = now + retry_after
        destination.failures = 0
        destination.window = <double>self.initial_concurrency
        if destination._has_queue():
            self._round_remove(destination)
        dropped = destination._drain()
        self._forget_if_idle(destination, now)  # dead for retry_after <= 0 is not dead
        return dropped

    def sweep(self, double now):
        """Forget every destination nobody needs any more, the dead whose backoff has ended
        included (the queue manager calls this at each queue scan)."""
        cdef Destination destination
        for destination in list(self._destinations.values()):
            self._forget_if_idle(destination, now)

    cdef inline int _forget_if_idle(self, Destination destination, double now) except -1:
        """Keep memory bounded by the busy and the dead: drop the state of a destination with
        no job queued or running, not dead, and its rate delay over."""
        if (not destination._has_queue() and destination.active == 0
                and destination.dead_until <= now and destination.next_start <= now):
            del self._destinations[destination.name]
            destination._forgotten = True
        return 0

    # -- queries -----------------------------------------------------------------------------

    def remembered(self):
        """How many destinations the scheduler holds state for."""
        return len(self._destinations)

    def suspended_reason(self, name, double now):
        found = self._destinations.get(name)
        if found is None or (<Destination>found).dead_until <= now:
            return None
        return (<Destination>found).last_failure

    def active(self, name):
        found = self._destinations.get(name)
        return (<Destination>found).active if found is not None else 0

    def window(self, name):
        found = self._destinations.get(name)
        if found is None:
            return <double>self.initial_concurrency
        return (<Destination>found).window

    def next_wakeup(self, double now):
        """The earliest moment a rate-delayed destination with queued work may start again."""
        cdef Destination destination = self._round
        cdef Py_ssize_t i
        cdef double earliest = 0.0
        cdef bint any_later = False
        for i in range(self._round_length):
            if destination.next_start > now:
                if not any_later or destination.next_start < earliest:  # min(), first wins
                    earliest = destination.next_start
                    any_later = True
            destination = destination._next
        return earliest if any_later else None
