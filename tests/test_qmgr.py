"""The queue manager's driver: attempts, concurrency, backoff, bounces and start-up rebuild.

Agents here are in-process functions (the real SMTP agent is tested against smtp-sink in
test_delivery_smtp and test_end_to_end); the spool is the in-memory one, the clock injected.
"""

import asyncio
import dataclasses
import io
import re

import pytest

from engine.cleanup import Cleanup
from engine.config import Config
from engine.delivery import (
    DeliveryOutcome,
    PermanentFailure,
    RecipientResult,
    TransientFailure,
)
from engine.delivery.route import nexthop_for
from engine.log import Maillog
from engine.qmgr.manager import QueueManager
from engine.spool import Envelope, QueuedMessage, Recipient, SpoolError, SpoolFull
from engine.spool.memory import MemorySpool

CONFIG = Config(myhostname="mx.test", relayhost="[127.0.0.1]:2526",
                default_destination_concurrency_limit=3,
                minimal_backoff_time=300.0, maximal_backoff_time=4000.0)


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def envelope(queue_id, recipients=("r@example.net",), arrival=1000.0):
    return Envelope(queue_id=queue_id, sender="s@example.org", arrival=arrival, size=10,
                    recipients=[Recipient(r, next_attempt=arrival) for r in recipients])


async def enqueue(spool, env):
    await spool.enqueue(QueuedMessage(env, [b"Subject: x\r\n\r\nbody\r\n"]))


def manager(spool, agent, clock=None, *, notices=False, **settings):
    """A QueueManager on ``spool``; ``notices`` gives it a Cleanup to queue bounces with."""
    log = io.StringIO()
    config = dataclasses.replace(CONFIG, **settings)
    maillog = Maillog("mx.test", stream=log)
    qmgr = QueueManager(spool, config, maillog, {"smtp": agent}, clock=clock or Clock())
    if notices:
        qmgr.cleanup = Cleanup(spool, maillog, config, on_queued=qmgr.notify_new,
                               clock=qmgr.clock)
    return qmgr, log


def sent(request):
    return DeliveryOutcome([RecipientResult(r, "sent", "2.0.0", "250 2.0.0 Ok", "sink[127.0.0.1]")
                            for r in request.recipients])


async def until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_new_mail_is_attempted_at_once_and_removed_when_sent():
    async def scenario():
        spool = MemorySpool()
        calls = []

        async def agent(request):
            calls.append((request.queue_id, request.recipients, request.content))
            return sent(request)

        qmgr, log = manager(spool, agent)
        await qmgr.start()
        env = envelope("Q1", ("a@example.net", "b@example.net"))
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return calls, log.getvalue()

    calls, log = asyncio.run(scenario())
    assert calls == [("Q1", ["a@example.net", "b@example.net"], b"Subject: x\r\n\r\nbody\r\n")]
    assert "Q1: to=<a@example.net>, relay=sink[127.0.0.1], delay=" in log
    assert "dsn=2.0.0, status=sent (250 2.0.0 Ok)" in log
    assert log.rstrip().endswith("Q1: removed")


def test_an_agents_warnings_are_logged_with_the_queue_id():
    """An agent's warnings (local(8): a .forward file it ignored) reach the maillog as
    Postfix's "warning: QUEUEID: ..." lines of that agent's service, before the result."""
    async def scenario():
        spool = MemorySpool()

        async def agent(request):
            outcome = sent(request)
            outcome.warnings.append("ignoring /home/bob/.forward: owned by uid 1001")
            return outcome

        qmgr, log = manager(spool, agent)
        await qmgr.start()
        env = envelope("Q1")
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return log.getvalue()

    log = asyncio.run(scenario())
    warning = re.search(r" tern/smtp\[\d+\]: warning: Q1: ignoring /home/bob/\.forward: "
                        r"owned by uid 1001\n", log)
    assert warning is not None, log
    assert warning.start() < log.index("Q1: to=<r@example.net>")


def test_concurrency_per_destination_is_limited():
    async def scenario():
        spool = MemorySpool()
        running, peak, release = 0, 0, asyncio.Event()

        async def agent(request):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            return sent(request)

        qmgr, _ = manager(spool, agent)
        await qmgr.start()
        for i in range(10):
            env = envelope(f"Q{i}")
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: running == 3)
        await asyncio.sleep(0.05)
        assert running == 3  # the limit holds while more work waits
        release.set()
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return peak

    assert asyncio.run(scenario()) == 3


def test_transient_failure_defers_with_backoff_and_keeps_reason():
    async def scenario():
        spool = MemorySpool()
        clock = Clock(1000.0)

        async def agent(request):
            raise TransientFailure("4.4.1", "connect to 127.0.0.1[127.0.0.1]:2526: refused")

        qmgr, log = manager(spool, agent, clock)
        await qmgr.start()
        env = envelope("Q1")
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelope("Q1").recipients[0].status == "deferred")
        await qmgr.stop()
        return spool.envelope("Q1"), log.getvalue()

    stored, log = asyncio.run(scenario())
    (recipient,) = stored.recipients
    assert recipient.next_attempt == 1000.0 + 300.0
    assert recipient.attempts == 1
    assert recipient.last_reply == "connect to 127.0.0.1[127.0.0.1]:2526: refused"
    assert "relay=none" in log and "dsn=4.4.1, status=deferred (connect to" in log


def test_permanent_reply_bounces_only_that_recipient():
    async def scenario():
        spool = MemorySpool()

        async def agent(request):
            return DeliveryOutcome([
                RecipientResult(r, "bounced" if r.startswith("bad") else "sent",
                                "5.1.1" if r.startswith("bad") else "2.0.0",
                                "550 5.1.1 no such user" if r.startswith("bad") else "250 ok")
                for r in request.recipients])

        qmgr, log = manager(spool, agent)
        await qmgr.start()
        env = envelope("Q1", ("bad@example.net", "good@example.net"))
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return log.getvalue()

    log = asyncio.run(scenario())
    assert "to=<bad@example.net>, relay=none" in log
    assert "dsn=5.1.1, status=bounced (550 5.1.1 no such user)" in log
    assert "to=<good@example.net>" in log and "status=sent" in log


@pytest.mark.parametrize("due_in, attempted", [(-1.0, True), (3600.0, False)])
def test_start_up_rebuilds_schedule_from_the_spool(due_in, attempted):
    async def scenario():
        spool = MemorySpool()
        clock = Clock(5000.0)
        env = envelope("Q1")
        env.recipients[0].status = "deferred"
        env.recipients[0].next_attempt = clock.now + due_in
        await enqueue(spool, env)
        calls = []

        async def agent(request):
            calls.append(request.queue_id)
            return sent(request)

        qmgr, _ = manager(spool, agent, clock)
        await qmgr.start()
        await asyncio.sleep(0.1)
        await qmgr.stop()
        return calls

    assert (asyncio.run(scenario()) == ["Q1"]) is attempted


def test_expired_deferred_mail_bounces():
    async def scenario():
        spool = MemorySpool()
        clock = Clock(1000.0 + CONFIG.maximal_queue_lifetime + 1)

        async def agent(request):
            raise TransientFailure("4.4.1", "still down")

        qmgr, log = manager(spool, agent, clock)
        await qmgr.start()
        env = envelope("Q1", arrival=1000.0)
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return log.getvalue()

    assert "dsn=4.4.1, status=expired (still down)" in asyncio.run(scenario())


def route_with_faults(domain, config, sender=""):
    """nexthop_for, except that bad.test cannot be routed and boom.test hits a bug."""
    if domain == "bad.test":
        raise PermanentFailure("5.1.2", "bad destination: bad.test")
    if domain == "boom.test":
        raise RuntimeError("routing bug")
    return nexthop_for(domain, config, sender)


def test_unroutable_recipient_bounces_alone_and_a_bug_does_not_stop_the_queue(monkeypatch):
    monkeypatch.setattr("engine.qmgr.manager.nexthop_for", route_with_faults)

    async def scenario():
        spool = MemorySpool()
        delivered = []

        async def agent(request):
            delivered.extend(request.recipients)
            return sent(request)

        clock = Clock()
        qmgr, log = manager(spool, agent, clock)
        await qmgr.start()
        for env in (envelope("Q1", ("u@bad.test", "v@example.net")),
                    envelope("Q2", ("u@boom.test",)), envelope("Q3", ("w@example.net",))):
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: [e.queue_id for e in spool.envelopes()] == ["Q2"])
        await qmgr.stop()
        return delivered, log.getvalue(), spool.envelope("Q2")

    delivered, log, stuck = asyncio.run(scenario())
    assert sorted(delivered) == ["v@example.net", "w@example.net"]
    assert "Q1: to=<u@bad.test>, relay=none" in log
    assert "dsn=5.1.2, status=bounced (bad destination: bad.test)" in log
    assert "warning: Q2: cannot activate: RuntimeError('routing bug')" in log
    assert stuck.recipients[0].status == "pending"  # kept, retried later


class FlakySpool(MemorySpool):
    """A spool whose first envelope update fails (a full or broken disk, for a moment)."""

    def __init__(self):
        super().__init__()
        self.failures = 1

    async def update(self, env):
        if self.failures:
            self.failures -= 1
            raise SpoolError("disk full")
        await super().update(env)


def test_failed_spool_update_keeps_the_message_queued_and_retried():
    async def scenario():
        spool = FlakySpool()
        attempts = []

        async def agent(request):
            attempts.append(request.queue_id)
            if len(attempts) == 1:
                raise TransientFailure("4.4.1", "down")
            return sent(request)

        clock = Clock(1000.0)
        qmgr, log = manager(spool, agent, clock)
        await qmgr.start()
        env = envelope("Q1")
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: "cannot update queue file" in log.getvalue() and not qmgr._active)
        clock.now += CONFIG.queue_run_delay  # the next scan of the queue finds it again
        qmgr._wake.set()
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return attempts, log.getvalue()

    attempts, log = asyncio.run(scenario())
    assert "warning: Q1: cannot update queue file: disk full" in log
    # the spool kept the message as it was (due at arrival): retried at the next scan
    assert attempts == ["Q1", "Q1"]


def test_active_queue_is_bounded_and_everything_still_goes():
    async def scenario():
        spool = MemorySpool()
        peak, release = 0, asyncio.Event()

        async def agent(request):
            nonlocal peak
            peak = max(peak, len(qmgr._active))
            await release.wait()
            return sent(request)

        qmgr, _ = manager(spool, agent, qmgr_message_active_limit=4)
        await qmgr.start()
        for i in range(20):  # different destinations: concurrency is not what limits here
            env = envelope(f"Q{i:02d}", (f"r@d{i}.example.net",))
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: len(qmgr._active) == 4)
        await asyncio.sleep(0.05)
        assert len(qmgr._active) == 4
        release.set()
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return peak

    assert asyncio.run(scenario()) == 4


def test_deferred_mail_waits_for_the_next_queue_scan():
    async def scenario():
        spool, clock, attempts = MemorySpool(), Clock(1000.0), []

        async def agent(request):
            attempts.append(clock.now)
            raise TransientFailure("4.4.1", "down")

        qmgr, _ = manager(spool, agent, clock, minimal_backoff_time=10.0,
                          maximal_backoff_time=10.0, queue_run_delay=60.0)
        await qmgr.start()
        env = envelope("Q1", arrival=1000.0)
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelope("Q1").recipients[0].status == "deferred")
        clock.now = 1030.0  # past the 10 s backoff, before the next scan (1000 + 60)
        qmgr._wake.set()
        await asyncio.sleep(0.05)
        early = list(attempts)
        clock.now = 1061.0
        qmgr._wake.set()
        await until(lambda: len(attempts) == 2)
        await qmgr.stop()
        return early, attempts

    early, attempts = asyncio.run(scenario())
    assert early == [1000.0]
    assert attempts == [1000.0, 1061.0]


def test_dead_destination_defers_its_queue_without_trying():
    async def scenario():
        spool, calls = MemorySpool(), []

        async def agent(request):
            calls.append(request.queue_id)
            await asyncio.sleep(0.01)
            raise TransientFailure("4.4.1", "connect to 127.0.0.1[127.0.0.1]:2526: refused")

        qmgr, log = manager(spool, agent, default_destination_concurrency_limit=20,
                            initial_destination_concurrency=2)
        await qmgr.start()
        for i in range(10):
            env = envelope(f"Q{i}")
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: all(e.recipients[0].status == "deferred"
                                for e in spool.envelopes()))
        await qmgr.stop()
        return calls, log.getvalue()

    calls, log = asyncio.run(scenario())
    assert len(calls) < 10  # the rest never reached the agent
    suspended = re.findall(r"status=deferred \(delivery temporarily suspended: connect to", log)
    assert len(suspended) == 10 - len(calls)


def bounced_by(request):
    return DeliveryOutcome([RecipientResult(r, "bounced", "5.1.1",
                                            "host x said: 550 5.1.1 no such user",
                                            "x[127.0.0.1]:25") for r in request.recipients])


def run_one(agent, *, recipients=("r@example.net",), sender="s@example.org", notify="",
            stop_when=lambda spool: spool.envelope("Q1") is None, smtputf8=False, **settings):
    async def scenario():
        spool = MemorySpool()
        qmgr, log = manager(spool, agent, notices=True, **settings)
        qmgr.agents["smtp"] = agent
        await qmgr.start()
        env = envelope("Q1", recipients)
        env.sender = sender
        env.smtputf8 = smtputf8
        for recipient in env.recipients:
            recipient.notify = notify
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: stop_when(spool))
        await asyncio.sleep(0.05)
        await qmgr.stop()
        return spool, log.getvalue()

    return asyncio.run(scenario())


def test_failure_bounces_to_the_sender_from_the_null_sender():
    deliveries = []

    async def agent(request):
        deliveries.append((request.sender, request.recipients, request.content))
        return bounced_by(request) if request.queue_id == "Q1" else sent(request)

    spool, log = run_one(agent)
    match = re.search(r"Q1: sender non-delivery notification: (\w+)", log)
    assert match, log
    sender, recipients, content = deliveries[-1]
    assert (sender, recipients) == ("", ["s@example.org"])
    assert b"multipart/report; report-type=delivery-status" in content
    assert b"Final-Recipient: rfc822; r@example.net" in content
    assert b"Action: failed" in content


def test_bounce_of_an_smtputf8_message_is_itself_smtputf8():
    """As Postfix's bounce(8): the notice about a message sent with SMTPUTF8 is queued with
    SMTPUTF8 requested, so its delivery says MAIL FROM:<> … SMTPUTF8 where needed; an ASCII
    message's notice is not."""
    requests = []

    async def agent(request):
        requests.append(request)
        return bounced_by(request) if request.queue_id == "Q1" else sent(request)

    run_one(agent, sender="jörg@example.org", recipients=("rené@example.net",), smtputf8=True)
    original, notice = requests
    assert (original.smtputf8, notice.smtputf8) == (True, True)
    assert (notice.sender, notice.recipients) == ("", ["jörg@example.org"])
    assert b"Content-Type: message/global-delivery-status" in notice.content
    assert "Final-Recipient: utf-8; rené@example.net".encode() in notice.content
    requests.clear()
    run_one(agent)
    assert [r.smtputf8 for r in requests] == [False, False]
    assert b"Content-Type: message/delivery-status" in requests[1].content


def test_notify_never_sends_no_bounce():
    async def agent(request):
        return bounced_by(request)

    _, log = run_one(agent, notify="NEVER")
    assert "notification" not in log and "Q1: removed" in log


def test_null_sender_failure_is_not_bounced_unless_2bounce_is_on():
    deliveries = []

    async def agent(request):
        deliveries.append(request.recipients)
        return bounced_by(request) if request.queue_id == "Q1" else sent(request)

    _, log = run_one(agent, sender="")
    assert "notification" not in log and deliveries == [["r@example.net"]]
    _, log = run_one(agent, sender="", notify_classes=("2bounce",),
                     double_bounce_notice_recipient="hostmaster@example.net")
    assert "Q1: postmaster non-delivery notification:" in log
    assert deliveries[-1] == ["hostmaster@example.net"]


def test_notify_success_sends_a_relayed_notice():
    deliveries = []

    async def agent(request):
        deliveries.append(request.content)
        return sent(request)

    _, log = run_one(agent, notify="SUCCESS")
    assert "Q1: sender delivery status notification:" in log
    assert b"Action: relayed" in deliveries[-1]


def test_delay_warning_once_after_delay_warning_time():
    deliveries = []

    async def agent(request):
        deliveries.append(request.content)
        if request.queue_id == "Q1":
            raise TransientFailure("4.4.1", "down")
        return sent(request)

    clock = Clock(1000.0 + 7200.0)  # the message arrived two hours ago

    def warned(spool):
        env = spool.envelope("Q1")
        return env is not None and env.recipients[0].warned

    spool, log = run_one(agent, stop_when=warned, delay_warning_time=3600.0, clock=clock)
    assert log.count("Q1: sender delay notification:") == 1
    assert any(b"Action: delayed" in content for content in deliveries)


def test_queue_operations_hold_release_delete_requeue_flush():
    async def scenario():
        spool, clock = MemorySpool(), Clock(1000.0)
        calls = []

        async def agent(request):  # a 4xx per recipient: no site failure, nobody dies
            calls.append(request.queue_id)
            return DeliveryOutcome([RecipientResult(r, "deferred", "4.2.0", "450 try later")
                                    for r in request.recipients])

        qmgr, log = manager(spool, agent, clock, queue_run_delay=3600.0)
        await qmgr.start()
        for name in ("Q1", "Q2", "Q3"):
            env = envelope(name, (f"r@{name.lower()}.example.net",))
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: all(e.recipients[0].status == "deferred"
                                for e in spool.envelopes()) and not qmgr._active)
        assert await qmgr.hold(["Q1", "nope"]) == ["Q1"]
        assert spool.envelope("Q1").held
        assert await qmgr.flush() == ["Q2", "Q3"]
        await until(lambda: len(calls) == 5)
        assert "Q1" not in calls[3:]  # held: not flushed
        await until(lambda: not qmgr._active)
        assert await qmgr.flush(domain="q3.example.net") == ["Q3"]
        await until(lambda: len(calls) == 6 and not qmgr._active)
        assert await qmgr.release(None) == ["Q1"]
        await until(lambda: len(calls) == 7 and not qmgr._active)
        assert sorted(await qmgr.requeue(["Q2"])) == ["Q2"]
        await until(lambda: len(calls) == 8 and not qmgr._active)
        assert sorted(await qmgr.delete(None, deferred_only=True)) == ["Q1", "Q2", "Q3"]
        await qmgr.stop()
        return calls, spool.envelopes(), log.getvalue()

    calls, left, log = asyncio.run(scenario())
    assert calls[6:] == ["Q1", "Q2"]
    assert left == []
    for line in ("Q1: placed on hold", "Q1: released from hold", "Q2: requeued", "Q3: removed"):
        assert line in log


def test_stop_lets_deliveries_in_flight_finish_and_record_their_results():
    async def scenario():
        spool = MemorySpool()

        async def agent(request):
            await asyncio.sleep(0.2)
            return sent(request)

        qmgr, log = manager(spool, agent)
        await qmgr.start()
        env = envelope("Q1")
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await asyncio.sleep(0.05)  # the delivery is in flight
        await qmgr.stop(grace=5.0)
        return spool.envelopes(), log.getvalue()

    left, log = asyncio.run(scenario())
    assert left == [] and "Q1: removed" in log


def test_a_message_found_by_a_scan_is_not_activated_again_by_its_notice():
    """The due index shows a committed message before cleanup calls notify_new."""
    async def scenario():
        spool, calls = MemorySpool(), []

        async def agent(request):
            calls.append(request.queue_id)
            await asyncio.sleep(0.05)
            return sent(request)

        qmgr, _ = manager(spool, agent)
        await qmgr.start()
        env = envelope("Q1")
        await enqueue(spool, env)
        qmgr._rescan()  # a scan runs before the notice
        await until(lambda: "Q1" in qmgr._active)
        qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return calls

    assert asyncio.run(scenario()) == ["Q1"]


class YieldingSpool(MemorySpool):
    """Every write yields to the event loop, as a real commit does, so operations interleave."""

    async def enqueue(self, message):
        await asyncio.sleep(0)
        await super().enqueue(message)

    async def update(self, env):
        encoded = env.encode()  # encoded at call time, as LmdbSpool does
        await asyncio.sleep(0.001)
        if env.queue_id in self._envelopes:
            self._envelopes[env.queue_id] = encoded

    async def remove(self, queue_id):
        await asyncio.sleep(0.001)
        await super().remove(queue_id)


def test_operations_on_all_while_mail_flows_never_resurrect_or_undo_deliveries():
    async def scenario():
        spool, delivered = YieldingSpool(), []

        async def agent(request):
            delivered.extend(request.recipients)
            await asyncio.sleep(0.002)
            return sent(request)

        qmgr, _ = manager(spool, agent, qmgr_message_active_limit=5)
        for i in range(60):
            await enqueue(spool, envelope(f"Q{i:02d}", (f"r{i}@example.net",)))
        await qmgr.start()
        for op in (qmgr.requeue, qmgr.hold, qmgr.release, qmgr.requeue, qmgr.release):
            await op(None)
        await until(lambda: spool.envelopes() == [], timeout=10)
        await qmgr.stop()
        return delivered

    delivered = asyncio.run(scenario())
    assert sorted(delivered) == sorted(f"r{i}@example.net" for i in range(60))  # once each


def test_hold_or_delete_during_the_settle_write_is_not_lost():
    async def scenario():
        gate = asyncio.Event()

        class SlowUpdateSpool(MemorySpool):
            async def update(self, env):
                await gate.wait()
                await super().update(env)

        spool = SlowUpdateSpool()

        async def agent(request):
            raise TransientFailure("4.4.1", "down")

        qmgr, _ = manager(spool, agent)
        await qmgr.start()
        for name in ("Q1", "Q2"):
            env = envelope(name, (f"r@{name.lower()}.example.net",))
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await asyncio.sleep(0.05)  # both are settling: their update waits on the gate
        assert await qmgr.hold(["Q1"]) == ["Q1"]
        assert await qmgr.delete(["Q2"]) == ["Q2"]
        gate.set()
        await until(lambda: not qmgr._active)
        await qmgr.stop()
        return spool.envelope("Q1"), spool.envelope("Q2")

    held, deleted = asyncio.run(scenario())
    assert held is not None and held.held
    assert deleted is None


def test_double_bounces_cannot_loop():
    async def scenario():
        spool, attempts = MemorySpool(), []

        async def agent(request):  # everything fails, the postmaster's notice too
            attempts.append((request.sender, request.recipients))
            return bounced_by(request)

        qmgr, log = manager(spool, agent, notices=True, notify_classes=("2bounce",),
                            double_bounce_notice_recipient="postmaster@example.net")
        await qmgr.start()
        env = envelope("Q1")
        env.sender = ""
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: "undeliverable postmaster notification discarded" in log.getvalue())
        await asyncio.sleep(0.1)
        await qmgr.stop()
        return attempts, spool.envelopes()

    attempts, left = asyncio.run(scenario())
    assert attempts == [("", ["r@example.net"]),
                        ("double-bounce@mx.test", ["postmaster@example.net"])]
    assert left == []


def test_a_notice_that_cannot_be_queued_keeps_the_states_and_is_retried():
    async def scenario():
        spool, clock, delivered = MemorySpool(), Clock(1000.0), []

        async def agent(request):
            delivered.extend(request.recipients)
            return bounced_by(request) if request.queue_id == "Q1" else sent(request)

        qmgr, log = manager(spool, agent, clock, notices=True)
        real_inject, failures = qmgr.cleanup.inject, [1]

        async def inject(*args, **kwargs):
            if failures:
                failures.pop()
                raise SpoolFull("map full")
            return await real_inject(*args, **kwargs)

        qmgr.cleanup.inject = inject
        await qmgr.start()
        env = envelope("Q1", ("bad@example.net",))
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: "cannot queue a notice" in log.getvalue() and not qmgr._active)
        stored = spool.envelope("Q1")
        clock.now += CONFIG.minimal_backoff_time + CONFIG.queue_run_delay
        qmgr._wake.set()
        await until(lambda: "sender non-delivery notification" in log.getvalue())
        await until(lambda: spool.envelope("Q1") is None)
        await qmgr.stop()
        return stored, delivered

    stored, delivered = asyncio.run(scenario())
    assert stored.recipients[0].status == "bounced" and stored.notice_retry > 0
    assert delivered.count("bad@example.net") == 1  # the state was kept: no second attempt


def test_a_failure_after_the_attempt_does_not_strand_the_message(monkeypatch):
    async def scenario():
        spool = MemorySpool()
        qmgr, log = manager(spool, lambda request: asyncio.sleep(0, sent(request)))
        real_record, failures = qmgr._record, [1]

        def record(*args, **kwargs):
            if failures:
                failures.pop()
                raise OSError("No space left on device")
            return real_record(*args, **kwargs)

        monkeypatch.setattr(qmgr, "_record", record)
        await qmgr.start()
        env = envelope("Q1")
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: not qmgr._active)
        await qmgr.stop()
        return log.getvalue(), spool.envelope("Q1")

    log, kept = asyncio.run(scenario())
    assert "warning: queue manager task failed: OSError('No space left on device')" in log
    assert kept is not None  # still queued for a later attempt, not lost nor stuck active


def test_new_mail_waits_its_turn_behind_a_backlog():
    async def scenario():
        spool, order = MemorySpool(), []

        async def agent(request):
            order.append(request.queue_id)
            await asyncio.sleep(0.005)
            return sent(request)

        qmgr, _ = manager(spool, agent, qmgr_message_active_limit=2)
        for i in range(6):
            await enqueue(spool, envelope(f"OLD{i}", (f"r@o{i}.example.net",), arrival=900.0))
        await qmgr.start()
        await asyncio.sleep(0.001)
        for i in range(6):
            env = envelope(f"NEW{i}", (f"r@n{i}.example.net",))
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return order

    order = asyncio.run(scenario())
    assert sorted(order[:6]) == [f"OLD{i}" for i in range(6)]


def test_with_a_backlog_a_freed_slot_goes_to_the_due_index_not_to_new_mail():
    async def scenario():
        spool = MemorySpool()
        qmgr, _ = manager(spool, sent, qmgr_message_active_limit=2)
        for i in range(4):
            await enqueue(spool, envelope(f"OLD{i}", (f"r@o{i}.example.net",), arrival=900.0))
        qmgr._scan(1000.0)  # fills the active queue; more is due: a backlog
        assert sorted(qmgr._active) == ["OLD0", "OLD1"] and qmgr._backlog
        qmgr._active.pop("OLD0")  # a slot frees up…
        new = envelope("NEW")
        await enqueue(spool, new)
        qmgr.notify_new(new)  # …and new mail arrives at that moment
        return sorted(qmgr._active)

    assert asyncio.run(scenario()) == ["OLD1"]  # NEW waits in the index, behind OLD2, OLD3


def test_a_message_being_held_is_not_activated_from_its_old_copy():
    async def scenario():
        gate = asyncio.Event()

        class SlowUpdateSpool(MemorySpool):
            async def update(self, env):
                encoded = env.encode()
                await gate.wait()
                self._envelopes[env.queue_id] = encoded

        spool, calls = SlowUpdateSpool(), []

        async def agent(request):
            calls.append(request.queue_id)
            return sent(request)

        clock = Clock(500.0)  # Q1 (arrival 1000) is not due yet
        qmgr, _ = manager(spool, agent, clock)
        await enqueue(spool, envelope("Q1"))
        await qmgr.start()
        await asyncio.sleep(0.01)
        holding = asyncio.create_task(qmgr.hold(["Q1"]))
        await asyncio.sleep(0.01)  # the hold's write is in flight; the spool has the old copy
        clock.now = 2000.0  # now it is due, and a scan runs
        qmgr._rescan()
        await asyncio.sleep(0.05)
        gate.set()
        await holding
        await asyncio.sleep(0.05)
        await qmgr.stop()
        return calls, spool.envelope("Q1")

    calls, stored = asyncio.run(scenario())
    assert calls == [] and stored.held


def test_bounce_queue_lifetime_expires_null_sender_mail_sooner():
    async def scenario():
        spool = MemorySpool()
        clock = Clock(1000.0 + 2 * 3600.0)  # both messages arrived two hours ago

        async def agent(request):
            raise TransientFailure("4.4.1", "down")

        qmgr, log = manager(spool, agent, clock, bounce_queue_lifetime=3600.0)
        await qmgr.start()
        for name, sender in (("BOUNCE", ""), ("NORMAL", "s@example.org")):
            env = envelope(name)
            env.sender = sender
            await enqueue(spool, env)
            qmgr.notify_new(env)
        await until(lambda: spool.envelope("BOUNCE") is None and not qmgr._active)
        await qmgr.stop()
        return log.getvalue(), spool.envelope("NORMAL")

    log, normal = asyncio.run(scenario())
    assert "BOUNCE: to=<r@example.net>, relay=none" in log and "status=expired" in log
    assert normal.recipients[0].status == "deferred"  # maximal_queue_lifetime: 5 days


def test_recipients_for_one_destination_go_fifty_per_transaction():
    async def scenario():
        spool, transactions = MemorySpool(), []

        async def agent(request):
            transactions.append(len(request.recipients))
            return sent(request)

        qmgr, _ = manager(spool, agent)
        await qmgr.start()
        env = envelope("Q1", tuple(f"r{i}@example.net" for i in range(120)))
        await enqueue(spool, env)
        qmgr.notify_new(env)
        await until(lambda: spool.envelopes() == [])
        await qmgr.stop()
        return sorted(transactions)

    assert asyncio.run(scenario()) == [20, 50, 50]


def test_dsn_request_is_passed_on_and_a_dsn_capable_next_hop_takes_the_duty():
    requests = []

    async def agent(request):
        requests.append(request)
        outcome = sent(request)
        outcome.dsn_passed = True
        return outcome

    def stored(spool):
        return spool.envelope("Q1") is None

    _, log = run_one(agent, notify="SUCCESS,FAILURE", stop_when=stored)
    (request,) = requests
    assert request.notify == {"r@example.net": "SUCCESS,FAILURE"}
    assert "notification" not in log  # the next hop reports success, not Tern
