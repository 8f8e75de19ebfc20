"""Differential test: the compiled scheduler and its pure-Python twin (the oracle) agree.

Both twins run in lockstep on the same Job objects through an arbitrary sequence of submit
(a few destinations, the clock moving forward), startable, finished (success or site failure,
arbitrary retry_after), sweep and the queries, how many destinations each remembers included.
Every return value must be identical: the same jobs in the same order, and floats to the last
bit. Now and then a job is finished that is not running (already finished, dropped, or still
queued) so that the compiled twin's memory of where a job started is checked against the twin's
lookup by name, exceptions included.
"""

import pytest
from conftest import load_or_skip
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.delivery import NextHop
from engine.qmgr.scheduler import Job

NEXTHOPS = [
    ("smtp", "a.test", 25, True),
    ("smtp", "b.test", 25, True),
    ("smtp", "10.0.0.1", 2525, False),
    ("lmtp", "a.test", 24, True),
]
DESTINATIONS = [NextHop(*fields).destination for fields in NEXTHOPS] + ["smtp:unknown.test:25"]

delays = st.one_of(st.sampled_from([0.0, 0.0, 0.5, 1.0, 7.25, 100.0]),
                   st.floats(0.0, 400.0, allow_nan=False))
retries = st.one_of(st.sampled_from([0.0, 1.0, 30.0, 300.0]), st.floats(0.0, 1000.0))
failures = st.one_of(st.none(), st.none(), st.sampled_from(["connection refused", "timeout", ""]))
pick = st.integers(0, 1000)
steps = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, len(NEXTHOPS) - 1), delays),
    st.tuples(st.just("submit"), st.integers(0, len(NEXTHOPS) - 1), st.just(0.0)),
    st.tuples(st.just("startable"), delays),
    st.tuples(st.just("finish"), pick, failures, retries, delays),
    st.tuples(st.just("finish"), pick, failures, retries, delays),
    st.tuples(st.just("stale"), pick, failures, retries, delays),
    st.tuples(st.just("query"), st.integers(0, len(DESTINATIONS) - 1), delays),
    st.tuples(st.just("sweep"), delays),
)
configs = st.fixed_dictionaries({
    "concurrency_limit": st.integers(0, 4),
    "initial_concurrency": st.integers(0, 5),
    "failed_cohort_limit": st.integers(0, 3),
    "rate_delay": st.sampled_from([0.0, 0.0, 1.5, 10.0]),
})


def observed(value):
    """A result as compared: jobs by identity (and queue ID, for a readable diff), floats by
    their exact bits, exceptions by class and arguments."""
    if isinstance(value, list):
        return [(id(job), job.queue_id) for job in value]
    if isinstance(value, float):
        return ("float", value.hex())
    return value


def call(method, *args, **kwargs):
    try:
        return observed(method(*args, **kwargs))
    except Exception as exc:  # the same class and args are expected from both twins
        return (type(exc), exc.args)


@pytest.fixture(scope="module")
def modules():
    """(pure, compiled): skipped when the compiled twin was not built, failed under
    TERN_REQUIRE_COMPILED=1."""
    return load_or_skip("scheduler", "pure"), load_or_skip("scheduler", "compiled")


def run_in_lockstep(modules, config, script):
    twins = tuple(module.Scheduler(**config) for module in modules)
    now = 0.0
    running, stale = [], []  # started and not finished; finished, dropped or never started
    counter = 0

    def both(name, *args, **kwargs):
        oracle, result = (call(getattr(twin, name), *args, **kwargs) for twin in twins)
        assert result == oracle, (name, args, kwargs)
        return oracle

    for step, (operation, *args) in enumerate(script):
        now += args[-1]
        if operation == "submit":
            counter += 1
            job = Job(f"Q{counter}", NextHop(*NEXTHOPS[args[0]]), ["r@x.test"], activated=now)
            both("submit", job, now)
            stale.append(job)  # queued or refused: finishing it now is a caller's mistake
        elif operation == "startable":
            started = twins[0].startable(now)
            assert observed(twins[1].startable(now)) == observed(started), step
            running += started
            stale = [job for job in stale if job not in started]
        elif operation in ("finish", "stale"):
            pool = running if operation == "finish" else stale
            if not pool:
                continue
            job = pool[args[0] % len(pool)]
            if operation == "finish":
                running.remove(job)
                stale.append(job)
            both("finished", job, now, site_failure=args[1], retry_after=args[2])
        elif operation == "sweep":
            both("sweep", now)
        else:
            name = DESTINATIONS[args[0]]
            both("suspended_reason", name, now)
            both("active", name)
            both("window", name)
            both("next_wakeup", now)
        for name in DESTINATIONS:  # the observable state after every step
            assert observed(twins[1].window(name)) == observed(twins[0].window(name)), step
            assert twins[1].active(name) == twins[0].active(name), step
            assert twins[1].suspended_reason(name, now) == twins[0].suspended_reason(name, now)
        assert observed(twins[1].next_wakeup(now)) == observed(twins[0].next_wakeup(now)), step
        assert twins[1].remembered() == twins[0].remembered(), step
    for attribute in ("concurrency_limit", "initial_concurrency", "failed_cohort_limit",
                      "rate_delay"):
        assert getattr(twins[1], attribute) == getattr(twins[0], attribute)


A_CONFIG = {"concurrency_limit": 2, "initial_concurrency": 1, "failed_cohort_limit": 1,
            "rate_delay": 0.0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, st.lists(steps, max_size=60))
@example(  # a job's destination forgotten and rebuilt while it runs (after a caller's mistake)
    A_CONFIG,
    [("submit", 0, 0.0), ("startable", 0.0), ("finish", 0, None, 0.0, 0.0),  # J1 forgets A
     ("submit", 0, 0.0), ("startable", 0.0),  # J2 runs on a new A
     ("stale", 0, None, 0.0, 0.0),  # J1 finished again: A forgotten while J2 runs
     ("submit", 0, 0.0), ("startable", 0.0),  # J3 runs on a third A
     ("finish", 0, None, 0.0, 0.0), ("query", 0, 0.0)],  # J2 must end on the third A
)
@example(  # death of a destination in the middle of the round robin, then a rate delay
    dict(A_CONFIG, rate_delay=1.5),
    [("submit", 0, 0.0), ("submit", 1, 0.0), ("submit", 2, 0.0), ("submit", 1, 0.0),
     ("startable", 0.0), ("finish", 1, "refused", 30.0, 0.5), ("startable", 2.0),
     ("query", 1, 0.0), ("submit", 1, 1.0), ("query", 1, 40.0), ("submit", 1, 0.0)],
)
@example(  # a failure streak of a whole cohort (2 x 2), forgetting and sweeping the dead
    dict(A_CONFIG, concurrency_limit=3, initial_concurrency=2, failed_cohort_limit=2),
    [("submit", 0, 0.0)] * 6 + [("submit", 1, 0.0), ("startable", 0.0),
     ("finish", 0, "refused", 30.0, 1.0), ("finish", 0, "refused", 30.0, 0.0),
     ("startable", 0.0), ("finish", 1, "refused", 30.0, 0.0), ("startable", 0.0),
     ("finish", 0, "timeout", 30.0, 0.0), ("finish", 0, "timeout", 0.0, 0.0),
     ("sweep", 30.5), ("query", 0, 0.0), ("sweep", 0.5), ("query", 0, 0.0)],
)
def test_compiled_and_pure_twins_agree(modules, config, script):
    run_in_lockstep(modules, config, script)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3), st.randoms(use_true_random=False))
def test_twins_agree_draining_a_busy_queue(modules, limit, initial, cohorts, rng):
    """Longer runs than the script test: 300 jobs over the destinations, drained by a queue
    manager's cycle (start what may start, finish some, one in ten a site failure)."""
    config = {"concurrency_limit": limit, "initial_concurrency": initial,
              "failed_cohort_limit": cohorts, "rate_delay": 0.0}
    script = [("submit", rng.randrange(len(NEXTHOPS)), 0.0) for _ in range(300)]
    for _ in range(200):
        script.append(("startable", rng.choice([0.0, 1.0])))
        for _ in range(rng.randrange(6)):
            failure = "timeout" if rng.random() < 0.1 else None
            script.append(("finish", rng.randrange(1000), failure, 10.0, 0.0))
    run_in_lockstep(modules, config, script)
