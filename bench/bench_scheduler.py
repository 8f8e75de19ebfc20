"""Compiled vs pure scheduler: a queue manager's submit / startable / finished cycle.

Run: pytest bench --benchmark-enable -p no:cacheprovider -k scheduler (see bench/README.md).
Each group holds the two twins side by side. Jobs are built once, outside the timing: the
scheduler only files and hands back the queue manager's Job objects.
"""

import pytest

from engine.delivery import NextHop
from engine.qmgr.scheduler import Job


def make_jobs(count, destinations):
    """``count`` one-recipient jobs spread evenly over ``destinations`` domains, each with its
    own NextHop (as the queue manager builds them per message)."""
    return [
        Job(f"Q{n:05d}", NextHop("smtp", f"d{n % destinations}.example"), [f"r{n}@x.example"])
        for n in range(count)
    ]


def drain(Scheduler, jobs, finish_per_pass=64):
    """Submit every job, then pass after pass: the oldest ``finish_per_pass`` deliveries end
    (one in a hundred with a site failure), the queue manager asks what may start and when to
    wake. Returns the number of jobs that ended or were dropped."""
    scheduler = Scheduler(20, initial_concurrency=5, failed_cohort_limit=1)
    now = 0.0
    for job in jobs:
        scheduler.submit(job, now)
    running = scheduler.startable(now)
    ended = 0
    while running:
        now += 0.05
        for job in running[:finish_per_pass]:
            failure = "timeout" if ended % 100 == 99 else None
            ended += 1 + len(scheduler.finished(job, now, site_failure=failure, retry_after=0.0))
        del running[:finish_per_pass]
        running += scheduler.startable(now)
        scheduler.next_wakeup(now)
    return ended


def saturated(Scheduler, destinations, queued, limit):
    """Every destination at its concurrency limit with ``queued`` more jobs waiting."""
    scheduler = Scheduler(limit, initial_concurrency=limit)
    for job in make_jobs(destinations * (limit + queued), destinations):
        scheduler.submit(job, 0.0)
    running = scheduler.startable(0.0)
    assert len(running) == destinations * limit
    return (scheduler, running), {}


def trickle(scheduler, running):
    """One delivery ends at a time; each startable walks the whole round robin past the
    destinations at their limit to find the one slot that opened."""
    started = 0
    for job in running[:]:
        scheduler.finished(job, 1.0)
        started += len(scheduler.startable(1.0))
    return started


@pytest.mark.parametrize("count,destinations", [(10_000, 100), (10_000, 1_000)],
                         ids=["10k-jobs-100-destinations", "10k-jobs-1000-destinations"])
def test_drain_a_full_queue(benchmark, twin, count, destinations):
    jobs = make_jobs(count, destinations)
    benchmark.group = f"drain {count} jobs over {destinations} destinations"
    assert benchmark(drain, twin("scheduler").Scheduler, jobs) == count


def test_round_robin_past_destinations_at_their_limit(benchmark, twin):
    Scheduler = twin("scheduler").Scheduler
    benchmark.group = "200 destinations at their limit: 400 x (finished, startable)"
    started = benchmark.pedantic(trickle, setup=lambda: saturated(Scheduler, 200, 4, 2),
                                 rounds=20, warmup_rounds=1)
    assert started == 400
