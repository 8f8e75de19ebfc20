"""The queue manager's pure per-destination logic, with the clock passed in."""

from engine.delivery import NextHop
from engine.qmgr.scheduler import Job, Scheduler, backoff, batches

A = "smtp:a.test:25"


def job(queue_id, host="a.test"):
    return Job(queue_id, NextHop("smtp", host), ["r@" + host])


def fill(scheduler, count, host="a.test", now=0.0):
    for i in range(count):
        assert scheduler.submit(job(f"{host}-{i}", host), now)


def test_backoff_doubles_from_minimal_to_maximal():
    assert [backoff(n, 300, 4000) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


def test_batches_split_recipients_by_limit():
    assert batches(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]


def test_slow_start_begins_at_initial_concurrency():
    scheduler = Scheduler(concurrency_limit=20, initial_concurrency=5)
    fill(scheduler, 30)
    assert len(scheduler.startable(0.0)) == 5
    assert scheduler.startable(0.0) == []


def test_successes_open_the_window_up_to_the_limit():
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


def test_site_failures_close_the_window_and_a_failed_cohort_kills_the_destination():
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


def test_one_failure_does_not_kill_a_destination():
    scheduler = Scheduler(concurrency_limit=20, initial_concurrency=5)
    fill(scheduler, 3)
    first = scheduler.startable(0.0)
    assert scheduler.finished(first[0], 1.0, site_failure="timeout", retry_after=300) == []
    assert scheduler.suspended_reason(A, 1.0) is None
    assert scheduler.window(A) < 5


def test_round_robin_across_destinations():
    scheduler = Scheduler(concurrency_limit=10, initial_concurrency=10)
    for i in range(3):
        scheduler.submit(job(f"a{i}"), 0.0)
    scheduler.submit(job("b0", "b.test"), 0.0)
    assert [j.queue_id for j in scheduler.startable(0.0)] == ["a0", "b0", "a1", "a2"]


def test_one_busy_destination_does_not_block_others():
    scheduler = Scheduler(concurrency_limit=1, initial_concurrency=1)
    for name in ("a0", "a1"):
        scheduler.submit(job(name), 0.0)
    scheduler.submit(job("b0", "b.test"), 0.0)
    assert sorted(j.queue_id for j in scheduler.startable(0.0)) == ["a0", "b0"]
    assert scheduler.active(A) == 1


def test_rate_delay_spaces_deliveries_one_at_a_time():
    scheduler = Scheduler(concurrency_limit=20, rate_delay=10.0)
    fill(scheduler, 3)
    (first,) = scheduler.startable(100.0)
    scheduler.finished(first, 101.0)
    assert scheduler.startable(105.0) == []
    assert scheduler.next_wakeup(105.0) == 110.0
    assert len(scheduler.startable(110.0)) == 1


def test_idle_destinations_are_forgotten():
    scheduler = Scheduler()
    fill(scheduler, 1)
    (running,) = scheduler.startable(0.0)
    scheduler.finished(running, 0.0)
    assert scheduler._destinations == {}
