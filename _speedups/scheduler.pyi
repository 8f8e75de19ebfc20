"""Type stub of the compiled twin of engine.qmgr.scheduler (built as engine._compiled.scheduler)."""

from engine.qmgr.scheduler import Job as Job
from engine.qmgr.scheduler import backoff as backoff
from engine.qmgr.scheduler import batches as batches

class Destination:
    """One transport + next hop (read-only view of the compiled state)."""

    name: str
    window: float
    active: int
    failures: int
    cohort: int
    dead_until: float
    next_start: float
    last_failure: str

class Scheduler:
    concurrency_limit: int
    initial_concurrency: int
    failed_cohort_limit: int
    rate_delay: float
    def __init__(self, concurrency_limit: int = 20, *, initial_concurrency: int = 5,
                 failed_cohort_limit: int = 1, rate_delay: float = 0.0) -> None: ...
    def submit(self, job: Job, now: float) -> bool: ...
    def startable(self, now: float) -> list[Job]: ...
    def finished(self, job: Job, now: float, *, site_failure: str | None = None,
                 retry_after: float = 0.0) -> list[Job]: ...
    def sweep(self, now: float) -> None: ...
    def remembered(self) -> int: ...
    def suspended_reason(self, name: str, now: float) -> str | None: ...
    def active(self, name: str) -> int: ...
    def window(self, name: str) -> float: ...
    def next_wakeup(self, now: float) -> float | None: ...
