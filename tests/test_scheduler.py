"""The queue manager's per-destination logic, with the clock passed in.

Scheduler cases run against both twins (the ``impl`` fixture): engine.qmgr.scheduler and the
compiled engine._compiled.scheduler. Job, backoff and batches live in the pure module only.
"""

import pytest

from engine.delivery import NextHop
from engine.qmgr.scheduler import Job, backoff, batches

A = "smtp:a.test:25"


@pytest.fixture
def Scheduler(impl):
    return impl("scheduler").Scheduler


def job(queue_id, host="a.test"):
    return Job(queue_id, NextHop("smtp", host), ["r@" + host])


def fill(scheduler, count, host="a.test", now=0.0):
    for i in range(count):
        assert scheduler.submit(job(f"{host}-{i}", host), now)


def test_backoff_doubles_from_minimal_to_maximal():
    assert [backoff(n, 300, 4000) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


def test_batches_split_recipients_by_limit():
    assert batches(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]


def test_slow_start_begins_at_initial_concurrency(Scheduler):
    scheduler = Scheduler(concurrency_limit=20, initial_concurrency=5)
    fill(scheduler, 30)
    assert len(scheduler.startable(0.0)) == 5
    assert scheduler.startable(0.0) == []


def test_successes_open_the_window_up_to_the_limit(Scheduler):
    scheduler = Scheduler(concurrency_limit=8, initial_concurrency=2)
    fill(scheduler, 200)
    running = scheduler.startable(0.0)
    peak = len(running)
    for _ in range(150):
        scheduler.finished(running.pop(0), 0.0)
        running += scheduler.startable(0.0)
        peak = max(peak, len(running))
    assert peak == 8
    assert scheduler.window(A) == 8


def test_site_failures_close_the_window_and_a_failed_cohort_kills_the_destination(Scheduler):
    scheduler = Scheduler(concurrency_limit=20, initial_concurrency=5, failed_cohort_limit=1)
    fill(scheduler, 12)
    first = scheduler.startable(0.0)
    assert len(first) == 5
    dropped = []
    for running in first:
        dropped += scheduler.finished(running, 10.0, site_failure="connection refused",
                                      retry_after=300.0)
    assert sorted(j.queue_id for j in dropped) == sorted(f"a.test-{i}" for i in range(5, 12))
    assert scheduler.suspended_reason(A, 11.0) == "connection refused"
    assert not scheduler.submit(job("late"), 11.0)  # dead: the caller defers it
    assert scheduler.suspended_reason(A, 311.0) is None
    assert scheduler.submit(job("later"), 311.0)


@pytest.mark.parametrize(("initial", "cohorts"), [(5, 1), (2, 1), (1, 1), (2, 2), (3, 3)])
def test_a_destination_dies_when_a_whole_cohort_failed(Scheduler, initial, cohorts):
    """The cohort is the window when the run of failures began: with an initial concurrency of
    5 the 5th consecutive failure kills (not the 4th, as the shrunk window would say)."""
    scheduler = Scheduler(concurrency_limit=20, initial_concurrency=initial,
                          failed_cohort_limit=cohorts)
    fill(scheduler, 40)
    running = scheduler.startable(0.0)
    assert len(running) == initial
    for failure in range(1, initial * cohorts):
        assert scheduler.finished(running.pop(0), 1.0, site_failure="refused",
                                  retry_after=60.0) == [], failure
        assert scheduler.suspended_reason(A, 1.0) is None, failure
        running += scheduler.startable(1.0)
    dropped = scheduler.finished(running.pop(0), 1.0, site_failure="refused", retry_after=60.0)
    assert dropped and scheduler.suspended_reason(A, 1.0) == "refused"


def test_one_failure_does_not_kill_a_destination(Scheduler):
    scheduler = Scheduler(concurrency_limit=20, initial_concurrency=5)
    fill(scheduler, 3)
    first = scheduler.startable(0.0)
    assert scheduler.finished(first[0], 1.0, site_failure="timeout", retry_after=300) == []
    assert scheduler.suspended_reason(A, 1.0) is None
    assert scheduler.window(A) < 5


def test_round_robin_across_destinations(Scheduler):
    scheduler = Scheduler(concurrency_limit=10, initial_concurrency=10)
    for i in range(3):
        scheduler.submit(job(f"a{i}"), 0.0)
    scheduler.submit(job("b0", "b.test"), 0.0)
    assert [j.queue_id for j in scheduler.startable(0.0)] == ["a0", "b0", "a1", "a2"]


def test_one_busy_destination_does_not_block_others(Scheduler):
    scheduler = Scheduler(concurrency_limit=1, initial_concurrency=1)
    for name in ("a0", "a1"):
        scheduler.submit(job(name), 0.0)
    scheduler.submit(job("b0", "b.test"), 0.0)
    assert sorted(j.queue_id for j in scheduler.startable(0.0)) == ["a0", "b0"]
    assert scheduler.active(A) == 1


def test_rate_delay_spaces_deliveries_one_at_a_time(Scheduler):
    scheduler = Scheduler(concurrency_limit=20, rate_delay=10.0)
    fill(scheduler, 3)
    (first,) = scheduler.startable(100.0)
    scheduler.finished(first, 101.0)
    assert scheduler.startable(105.0) == []
    assert scheduler.next_wakeup(105.0) == 110.0
    assert len(scheduler.startable(110.0)) == 1


def test_idle_destinations_are_forgotten(Scheduler):
    scheduler = Scheduler(initial_concurrency=5)
    fill(scheduler, 1)
    (running,) = scheduler.startable(0.0)
    scheduler.finished(running, 0.0)
    # A remembered destination would have a window of 5.2 after that success; a forgotten one
    # reads as new. The same destination starts afresh.
    assert scheduler.window(A) == 5.0
    assert scheduler.active(A) == 0
    fill(scheduler, 6)
    assert len(scheduler.startable(1.0)) == 5


def test_an_idle_destination_is_forgotten_after_a_site_failure(Scheduler):
    scheduler = Scheduler(initial_concurrency=5)
    fill(scheduler, 1)
    (running,) = scheduler.startable(0.0)
    assert scheduler.finished(running, 0.0, site_failure="timeout", retry_after=300.0) == []
    assert scheduler.window(A) == 5.0  # remembered, it would read 4.8
    assert scheduler.remembered() == 0


def test_destinations_that_failed_once_are_not_kept(Scheduler):
    scheduler = Scheduler(initial_concurrency=5)
    for i in range(50_000):
        assert scheduler.submit(job(f"q{i}", f"h{i}.test"), 0.0)
        (running,) = scheduler.startable(0.0)
        scheduler.finished(running, 0.0, site_failure="timeout", retry_after=300.0)
    assert scheduler.remembered() == 0


def test_a_destination_still_needed_is_remembered(Scheduler):
    scheduler = Scheduler(concurrency_limit=1, initial_concurrency=1)
    fill(scheduler, 2)  # one running, one queued
    fill(scheduler, 1, host="b.test")  # running
    (a0, b0) = scheduler.startable(0.0)
    scheduler.sweep(1.0)
    assert scheduler.remembered() == 2
    scheduler.finished(a0, 1.0)  # a.test-1 still queued
    scheduler.sweep(1.0)
    assert scheduler.remembered() == 2
    scheduler.finished(b0, 1.0)
    assert scheduler.remembered() == 1


def test_sweep_forgets_a_dead_destination_once_its_backoff_ends(Scheduler):
    scheduler = Scheduler(concurrency_limit=1, initial_concurrency=1)
    fill(scheduler, 3)
    (running,) = scheduler.startable(0.0)
    assert len(scheduler.finished(running, 1.0, site_failure="refused", retry_after=60.0)) == 2
    scheduler.sweep(60.9)
    assert scheduler.remembered() == 1
    assert scheduler.suspended_reason(A, 60.9) == "refused"  # still dead: kept
    scheduler.sweep(61.0)
    assert scheduler.remembered() == 0
    assert scheduler.submit(job("again"), 61.0)
    assert scheduler.window(A) == 1.0 and scheduler.remembered() == 1


@pytest.mark.parametrize("failure", [None, "timeout"])
def test_a_rate_delayed_destination_is_remembered_until_its_delay_ends(Scheduler, failure):
    scheduler = Scheduler(concurrency_limit=20, rate_delay=10.0)
    fill(scheduler, 1)
    (running,) = scheduler.startable(100.0)
    assert scheduler.finished(running, 101.0, site_failure=failure, retry_after=300.0) == []
    scheduler.sweep(109.0)
    assert scheduler.remembered() == 1
    assert scheduler.submit(job("next"), 102.0)
    assert scheduler.startable(105.0) == []  # the delay holds though the queue had emptied
    assert scheduler.next_wakeup(105.0) == 110.0
    (running,) = scheduler.startable(110.0)
    scheduler.finished(running, 111.0)
    scheduler.sweep(119.9)
    assert scheduler.remembered() == 1
    scheduler.sweep(120.0)
    assert scheduler.remembered() == 0


def test_constructor_clamps_limits_and_keeps_them_as_attributes(Scheduler):
    scheduler = Scheduler(0, initial_concurrency=50, failed_cohort_limit=0, rate_delay=2.5)
    assert (scheduler.concurrency_limit, scheduler.initial_concurrency) == (1, 1)
    assert (scheduler.failed_cohort_limit, scheduler.rate_delay) == (1, 2.5)
    scheduler = Scheduler(10, initial_concurrency=50)
    assert scheduler.initial_concurrency == 10
    assert scheduler.window(A) == 10.0


def test_a_dead_destination_leaves_the_round_robin(Scheduler):
    scheduler = Scheduler(concurrency_limit=1, initial_concurrency=1)
    fill(scheduler, 3)
    fill(scheduler, 3, host="b.test")
    first = scheduler.startable(0.0)
    assert [j.queue_id for j in first] == ["a.test-0", "b.test-0"]
    dropped = scheduler.finished(first[0], 1.0, site_failure="refused", retry_after=60.0)
    assert [j.queue_id for j in dropped] == ["a.test-1", "a.test-2"]
    scheduler.finished(first[1], 1.0)
    assert [j.queue_id for j in scheduler.startable(2.0)] == ["b.test-1"]
    assert scheduler.active(A) == 0
    assert scheduler.suspended_reason(A, 60.9) == "refused"
    assert scheduler.suspended_reason(A, 61.0) is None


def test_next_wakeup_is_none_without_a_rate_delay_or_queued_work(Scheduler):
    scheduler = Scheduler(rate_delay=0.0)
    fill(scheduler, 3)
    scheduler.startable(0.0)
    assert scheduler.next_wakeup(0.0) is None
    scheduler = Scheduler(rate_delay=5.0)
    fill(scheduler, 1)
    scheduler.startable(0.0)
    assert scheduler.next_wakeup(0.0) is None  # nothing left to start
