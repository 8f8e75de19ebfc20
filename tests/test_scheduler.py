"""The queue manager's pure scheduling logic, with the clock passed in."""

from engine.delivery import NextHop
from engine.qmgr.scheduler import Job, Scheduler, backoff, batches


def job(queue_id, host):
    return Job(queue_id, NextHop("smtp", host), ["r@" + host])


def test_backoff_doubles_from_minimal_to_maximal():
    assert [backoff(n, 300, 4000) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


def test_batches_split_recipients_by_limit():
    assert batches(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]


def test_due_returns_messages_whose_time_came_in_order():
    scheduler = Scheduler()
    scheduler.wait("late", 200.0)
    scheduler.wait("early", 100.0)
    assert scheduler.due(50.0) == []
    assert scheduler.next_wakeup() == 100.0
    assert scheduler.due(150.0) == ["early"]
    assert scheduler.due(250.0) == ["late"]
    assert scheduler.next_wakeup() is None


def test_concurrency_limit_per_destination():
    scheduler = Scheduler(concurrency_limit=2)
    for i in range(5):
        scheduler.submit(job(f"q{i}", "a.test"))
    started = scheduler.startable()
    assert [j.queue_id for j in started] == ["q0", "q1"]
    assert scheduler.startable() == []
    scheduler.finished(started[0])
    assert [j.queue_id for j in scheduler.startable()] == ["q2"]


def test_round_robin_across_destinations():
    scheduler = Scheduler(concurrency_limit=10)
    for i in range(3):
        scheduler.submit(job(f"a{i}", "a.test"))
    scheduler.submit(job("b0", "b.test"))
    order = [j.queue_id for j in scheduler.startable()]
    assert order == ["a0", "b0", "a1", "a2"]


def test_one_busy_destination_does_not_block_others():
    scheduler = Scheduler(concurrency_limit=1)
    scheduler.submit(job("a0", "a.test"))
    scheduler.submit(job("a1", "a.test"))
    scheduler.submit(job("b0", "b.test"))
    assert sorted(j.queue_id for j in scheduler.startable()) == ["a0", "b0"]
    assert scheduler.active("smtp:a.test:25") == 1
