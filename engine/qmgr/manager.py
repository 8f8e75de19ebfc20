"""The queue manager's asyncio driver: fills the active queue, starts delivery agents, records
results, sends notices, and carries out queue operations.

Memory is bounded by ``qmgr_message_active_limit``: messages wait in the spool's due index, not
here. New mail is activated at once when there is room; deferred mail is found by a scan of the
index every ``queue_run_delay`` (and when room frees up, and on flush / release). A recipient is
marked done only after the agent reports the next hop's 2xx, and the new state is written to
the spool before the message leaves the active queue, so a crash can cause a second delivery
but never none. Does no protocol I/O itself.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine import speedups
from engine.config import Config
from engine.delivery import (
    DeliveryOutcome,
    DeliveryRequest,
    NextHop,
    PermanentFailure,
    RecipientResult,
    TransientFailure,
)
from engine.delivery.agents import service_name
from engine.delivery.route import nexthop_for
from engine.log import Maillog, format_delay
from engine.qmgr.notices import Notices
from engine.qmgr.operations import QueueOperations
from engine.qmgr.scheduler import Job, backoff, batches
from engine.smtp.grammar import domain_of
from engine.spool import Envelope, SpoolError

Agent = Callable[[DeliveryRequest], Awaitable[DeliveryOutcome]]


@dataclass
class Attempt:
    """What one job's delivery produced: the outcome, and a site failure's reason if any."""

    outcome: DeliveryOutcome
    site_failure: str | None = None


class QueueManager(QueueOperations):
    def __init__(self, spool, config: Config, maillog: Maillog, agents: dict[str, Agent],
                 clock: Callable[[], float] = time.time, cleanup=None) -> None:
        self.spool = spool
        self.config = config
        self.maillog = maillog
        self.agents = agents
        self.clock = clock
        self.notices = Notices(config, maillog, spool, clock, cleanup)
        # the compiled twin of engine.qmgr.scheduler.Scheduler when built (engine.speedups)
        self.scheduler = speedups.load("scheduler").Scheduler(
            config.default_destination_concurrency_limit,
            initial_concurrency=config.initial_destination_concurrency,
            failed_cohort_limit=config.default_destination_concurrency_failed_cohort_limit,
            rate_delay=config.default_destination_rate_delay)
        self._active: dict[str, Envelope] = {}  # the active queue (bounded)
        self._outstanding: dict[str, int] = {}  # queue ID → jobs not yet finished
        self._doomed: set[str] = set()  # deleted while active: removed when its jobs end
        self._touched: set[str] = set()  # changed by an operator while active: write again
        self._busy: set[str] = set()  # an operator's write is in flight: do not activate
        self._wake = asyncio.Event()
        self._scan_wanted = True  # scan at the next pass (operator, new mail with no room)
        self._backlog = False  # the last scan stopped at the limit: more is due in the spool
        # Refill the active queue in batches: each scan reads past the active messages.
        self._refill_batch = max(1, min(100, config.qmgr_message_active_limit // 10))
        self._next_scan = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None

    @property
    def cleanup(self):
        """Where notices are queued (engine.cleanup.Cleanup); None sends none."""
        return self.notices.cleanup

    @cleanup.setter
    def cleanup(self, cleanup) -> None:
        self.notices.cleanup = cleanup

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Run: the first scan of the due index picks up whatever the spool holds."""
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, grace: float = 0.0) -> None:
        """Stop scheduling; give deliveries in flight ``grace`` seconds to finish and record
        their results, then cancel the rest (their recipients stay queued as they were)."""
        if self._runner is not None:
            self._runner.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:  # a finished delivery spawns its settle task: wait for those too
            pending = [task for task in self._tasks if not task.done()]
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                break
            await asyncio.wait(pending, timeout=remaining)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None

    def notify_new(self, envelope: Envelope) -> None:
        """A message was just committed: activate it at once if there is room; otherwise it
        waits in the spool's due index for the next scan."""
        if self._room() > 0 and not envelope.held and not self._backlog:
            self._try_activate(envelope, self.clock())
        else:
            self._backlog = True  # it waits in the due index, in due order with the rest
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------

    def _room(self) -> int:
        return self.config.qmgr_message_active_limit - len(self._active)

    async def _run(self) -> None:
        while True:
            now = self.clock()
            try:
                refill = self._backlog and self._room() >= self._refill_batch
                if self._scan_wanted or refill or now >= self._next_scan:
                    self._scan(now)
                for job in self.scheduler.startable(now):
                    self._spawn(self._deliver(job))
            except Exception as error:  # noqa: BLE001 - the queue manager must keep running
                self.maillog.line("qmgr", f"warning: queue manager pass failed: {error!r}")
                self._next_scan = now + min(self.config.queue_run_delay, 1.0)
            self._wake.clear()
            wakeups = [self._next_scan]
            rate_wakeup = self.scheduler.next_wakeup(now)
            if rate_wakeup is not None:
                wakeups.append(rate_wakeup)
            timeout = max(0.0, min(wakeups) - self.clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow stop()'s cancel when
            # the event is set at the same moment, and the runner would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.maillog.line("qmgr", f"warning: queue manager task failed: "
                                      f"{task.exception()!r}")

    def _scan(self, now: float) -> None:
        """Fill the active queue from the spool's due index, oldest due first."""
        self._scan_wanted = False
        if now >= self._next_scan:  # the periodic scan (others do not postpone it)
            self.scheduler.sweep(now)  # also forget idle destinations
            self._next_scan = now + self.config.queue_run_delay
        room = self._room()
        if room <= 0:
            return
        # Active messages are in the index too: ask for enough to see past them.
        wanted = room + len(self._active)
        due = self.spool.scan_due(now, wanted)
        self._backlog = len(due) >= wanted
        for queue_id in due:
            if room <= 0:
                break
            if queue_id in self._active:
                continue
            envelope = self.spool.envelope(queue_id)
            if envelope is None or envelope.held or not self._try_activate(envelope, now):
                continue
            room -= 1

    def _try_activate(self, envelope: Envelope, now: float) -> bool:
        """Activate, or log why not: one bad message must not stop the rest. It stays in the
        spool and is tried again at a later scan. A message already active is left alone: a
        scan can find a new message in the due index before cleanup's notice arrives."""
        if envelope.queue_id in self._active or envelope.queue_id in self._busy:
            return False
        try:
            self._activate(envelope, now)
            return True
        except Exception as error:  # noqa: BLE001
            queue_id = envelope.queue_id
            self.maillog.line("qmgr", f"warning: {queue_id}: cannot activate: {error!r}")
            self._active.pop(queue_id, None)
            self._outstanding.pop(queue_id, None)
            return False

    def _activate(self, envelope: Envelope, now: float) -> None:
        """Bring a message into the active queue and split its due recipients into jobs;
        a recipient that cannot be routed bounces, one whose destination is dead defers."""
        queue_id = envelope.queue_id
        self._active[queue_id] = envelope
        self.maillog.line("qmgr", f"{queue_id}: from=<{envelope.sender}>, size={envelope.size}, "
                                  f"nrcpt={len(envelope.recipients)} (queue active)")
        groups: dict[NextHop, list[str]] = {}
        immediate: list[RecipientResult] = []
        for recipient in envelope.recipients:
            if recipient.final or recipient.next_attempt > now:
                continue
            try:
                nexthop = nexthop_for(self._domain(recipient.address), self.config,
                                      envelope.sender)
            except PermanentFailure as failure:
                immediate.append(RecipientResult(recipient.address, "bounced", failure.dsn,
                                                 failure.text))
                continue
            suspended = self.scheduler.suspended_reason(nexthop.destination, now)
            if suspended is not None:
                immediate.append(self._suspension(recipient.address, suspended))
                continue
            groups.setdefault(nexthop, []).append(recipient.address)
        jobs = [
            Job(queue_id, nexthop, chunk, activated=now)
            for nexthop, addresses in groups.items()
            for chunk in batches(addresses, self.config.default_destination_recipient_limit)
        ]
        self._outstanding[queue_id] = len(jobs) + 1  # +1: this activation itself
        if immediate:
            self._record(envelope, immediate, "qmgr", self._delays(envelope, now, now))
        for job in jobs:
            if not self.scheduler.submit(job, now):
                self._defer_suspended(job, now)
        self._job_done(envelope)

    @staticmethod
    def _suspension(address: str, reason: str) -> RecipientResult:
        return RecipientResult(address, "deferred", "4.4.1",
                               f"delivery temporarily suspended: {reason}")

    def _defer_suspended(self, job: Job, now: float) -> None:
        """A job for a dead destination: defer its recipients without an attempt."""
        envelope = self._active[job.queue_id]
        reason = self.scheduler.suspended_reason(job.destination, now) or "destination dead"
        results = [self._suspension(r, reason) for r in job.recipients]
        self._record(envelope, results, "qmgr", self._delays(envelope, job.activated, now))
        self._job_done(envelope)

    def _domain(self, address: str) -> str:
        """The recipient's domain; a bare local part (``postmaster``) is local."""
        return domain_of(address) if "@" in address else self.config.myhostname.lower()

    # -- one delivery ------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        envelope = self._active[job.queue_id]
        started = self.clock()
        attempt: Attempt | None = None
        try:
            attempt = await self._attempt(job, envelope)
        finally:
            dropped = self.scheduler.finished(
                job, self.clock(), site_failure=attempt.site_failure if attempt else None,
                retry_after=self.config.minimal_backoff_time)
        try:
            outcome = attempt.outcome
            service = service_name(job.nexthop.transport, self.config)
            for warning in outcome.warnings:
                self.maillog.line(service, f"warning: {job.queue_id}: {warning}")
            self._record(envelope, outcome.results, service,
                         self._delays(envelope, job.activated, started, outcome),
                         conn_use=outcome.conn_use)
            if outcome.dsn_passed:  # the next hop took the DSN duty: no "relayed" notice
                for recipient in envelope.recipients:
                    if recipient.address in job.recipients and recipient.status == "sent":
                        recipient.notified = True
            for other in dropped:
                self._defer_suspended(other, self.clock())
        finally:  # whatever failed above (a full log disk…), the message must not be stranded
            self._job_done(envelope)

    def _job_done(self, envelope: Envelope) -> None:
        """One of the message's jobs ended; after the last, settle the message."""
        queue_id = envelope.queue_id
        remaining = self._outstanding[queue_id] - 1
        self._outstanding[queue_id] = remaining
        if remaining == 0:
            self._spawn(self._settle(envelope))

    async def _attempt(self, job: Job, envelope: Envelope) -> Attempt:
        agent = self.agents.get(job.nexthop.transport)
        try:
            if agent is None:
                raise TransientFailure(
                    "4.3.0", f"mail transport unavailable: no {job.nexthop.transport} agent")
            request = DeliveryRequest(
                queue_id=job.queue_id,
                sender=envelope.sender,
                recipients=job.recipients,
                content=self.spool.content(job.queue_id),
                nexthop=job.nexthop,
                body_8bit=envelope.body_8bit,
                smtputf8=envelope.smtputf8,
                # RFC 3461 §5.2.1: passed on when the next hop offers DSN
                ret=envelope.ret,
                envid=envelope.envid,
                notify={r.address: r.notify for r in envelope.recipients if r.notify},
                orcpt={r.address: r.orcpt for r in envelope.recipients if r.orcpt},
            )
            return Attempt(await agent(request))
        except (TransientFailure, PermanentFailure) as failure:
            status = "bounced" if isinstance(failure, PermanentFailure) else "deferred"
            outcome = DeliveryOutcome(results=[
                RecipientResult(r, status, failure.dsn, failure.text, failure.relay)
                for r in job.recipients
            ])
            # A transient failure of the whole session is the destination's: negative feedback.
            site = failure.text if isinstance(failure, TransientFailure) else None
            return Attempt(outcome, site_failure=site)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - an agent bug defers, never loses mail
            self.maillog.line("qmgr", f"warning: {job.queue_id}: delivery agent failed: {error!r}")
            return Attempt(DeliveryOutcome(results=[
                RecipientResult(r, "deferred", "4.3.0", f"delivery agent failed: {error}")
                for r in job.recipients
            ]))

    # -- results -----------------------------------------------------------------------------

    def _delays(self, envelope: Envelope, activated: float, started: float,
                outcome: DeliveryOutcome | None = None) -> str:
        """Postfix's delays=a/b/c/d: before the active queue, in it, connection setup,
        transmission."""
        parts = (max(0.0, activated - envelope.arrival), max(0.0, started - activated),
                 outcome.connect_seconds if outcome else 0.0,
                 outcome.transfer_seconds if outcome else 0.0)
        return "/".join(format_delay(x) for x in parts)

    def _lifetime(self, envelope: Envelope) -> float:
        """maximal_queue_lifetime, or bounce_queue_lifetime for a null-sender message."""
        if envelope.sender:
            return self.config.maximal_queue_lifetime
        return self.config.bounce_queue_lifetime

    def _record(self, envelope: Envelope, results: list[RecipientResult], service: str,
                delays: str, conn_use: int = 1) -> None:
        """Apply each recipient's result to the envelope and log it in Postfix's words
        (``conn_use=N`` when the connection carried earlier transactions)."""
        now = self.clock()
        reuse = f", conn_use={conn_use}" if conn_use > 1 else ""
        by_address = {r.address: r for r in envelope.recipients if not r.final}
        for result in results:
            recipient = by_address.get(result.recipient)
            if recipient is None:
                continue
            status, shown = result.status, result.status
            recipient.attempts += 1
            recipient.dsn = result.dsn
            recipient.last_reply = result.reply
            recipient.relay = result.relay
            if status == "deferred":
                if now - envelope.arrival >= self._lifetime(envelope):
                    status, shown = "bounced", "expired"
                else:
                    recipient.next_attempt = now + backoff(
                        recipient.attempts, self.config.minimal_backoff_time,
                        self.config.maximal_backoff_time)
            recipient.status = status
            if shown == "expired" and self.notices.will_notify(envelope, recipient, "FAILURE"):
                shown += ", returned to sender"
            self.maillog.line(
                service,
                f"{envelope.queue_id}: to=<{result.recipient}>, relay={result.relay}{reuse}, "
                f"delay={format_delay(now - envelope.arrival)}, delays={delays}, "
                f"dsn={result.dsn}, status={shown} ({result.reply})")

    # -- settling a message: notices, then the spool ------------------------------------------

    async def _settle(self, envelope: Envelope) -> None:
        """Every job of this round ended: send the notices owed, then remove the message or
        store its new state; it leaves the active queue either way. An operator's change
        (hold, delete) that arrives while this writes is written too."""
        queue_id = envelope.queue_id
        try:
            if queue_id not in self._doomed:
                await self.notices.send(envelope)
            while True:
                self._touched.discard(queue_id)
                if queue_id in self._doomed or not (envelope.unfinished
                                                    or envelope.notice_retry):
                    await self.spool.remove(queue_id)
                    self.maillog.line("qmgr", f"{queue_id}: removed")
                    break
                await self.spool.update(envelope)
                if queue_id not in self._touched and queue_id not in self._doomed:
                    break
        except SpoolError as error:
            # The spool keeps its older state: the message is retried, perhaps delivered twice.
            self.maillog.line("qmgr", f"warning: {queue_id}: cannot update queue file: {error}")
        finally:
            self._outstanding.pop(queue_id, None)
            self._active.pop(queue_id, None)
            self._doomed.discard(queue_id)
            self._touched.discard(queue_id)
            self._wake.set()

    def _rescan(self) -> None:
        self._scan_wanted = True
        self._wake.set()
