"""The queue manager's asyncio driver: feeds the scheduler, starts delivery agents, records results.

New mail is attempted at once; deferred mail waits in the scheduler until its backoff ends; at
start-up the schedule is rebuilt from the spool. A recipient is marked done only after the agent
reports the next hop's 2xx, and the state is written to the spool before the message is
forgotten, so a crash can cause a second delivery but never none. Does no protocol I/O itself.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from engine.config import Config
from engine.delivery import (
    DeliveryOutcome,
    DeliveryRequest,
    NextHop,
    PermanentFailure,
    RecipientResult,
    TransientFailure,
)
from engine.delivery.route import nexthop_for
from engine.log import Maillog, format_delay
from engine.qmgr.scheduler import Job, Scheduler, backoff, batches
from engine.smtp.grammar import domain_of
from engine.spool import Envelope, SpoolError

Agent = Callable[[DeliveryRequest], Awaitable[DeliveryOutcome]]


class QueueManager:
    def __init__(self, spool, config: Config, maillog: Maillog, agents: dict[str, Agent],
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.config = config
        self.maillog = maillog
        self.agents = agents
        self.clock = clock
        self.scheduler = Scheduler(config.default_destination_concurrency_limit)
        self._active: dict[str, Envelope] = {}  # messages with jobs queued or running
        self._outstanding: dict[str, int] = {}  # queue ID → jobs not yet finished
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the schedule from the spool, then run."""
        for envelope in self.spool.envelopes():
            due = envelope.next_due
            if due is None:
                await self.spool.remove(envelope.queue_id)  # finished before a crash
            elif not envelope.held:
                self.scheduler.wait(envelope.queue_id, due)
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop scheduling and cancel deliveries in flight; their recipients stay queued."""
        if self._runner is not None:
            self._runner.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    def notify_new(self, envelope: Envelope) -> None:
        """A message was just committed: attempt it at once."""
        self.scheduler.wait(envelope.queue_id, 0.0)
        self._active[envelope.queue_id] = envelope
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
            for queue_id in self.scheduler.due(now):
                try:
                    await self._activate(queue_id, now)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - one bad message must not stop the rest
                    self.maillog.line("qmgr", f"warning: {queue_id}: cannot activate: {error!r}")
                    self._active.pop(queue_id, None)
                    self.scheduler.wait(queue_id, now + self.config.minimal_backoff_time)
            for job in self.scheduler.startable():
                task = loop.create_task(self._deliver(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            wakeup = self.scheduler.next_wakeup()
            self._wake.clear()
            timeout = None if wakeup is None else max(0.0, wakeup - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _activate(self, queue_id: str, now: float) -> None:
        """Bring a due message into the active queue and split its due recipients into jobs;
        a recipient that cannot be routed bounces at once."""
        if self._outstanding.get(queue_id):
            return  # already active: its jobs will reschedule it
        envelope = self._active.get(queue_id) or self.spool.envelope(queue_id)
        if envelope is None or envelope.held:
            self._active.pop(queue_id, None)
            return
        self._active[queue_id] = envelope
        self.maillog.line("qmgr", f"{queue_id}: from=<{envelope.sender}>, size={envelope.size}, "
                                  f"nrcpt={len(envelope.recipients)} (queue active)")
        groups: dict[NextHop, list[str]] = {}
        unroutable: list[RecipientResult] = []
        for recipient in envelope.recipients:
            if recipient.final or recipient.next_attempt > now:
                continue
            try:
                nexthop = nexthop_for(self._domain(recipient.address), self.config)
            except PermanentFailure as failure:
                unroutable.append(RecipientResult(recipient.address, "bounced", failure.dsn,
                                                  failure.text))
                continue
            groups.setdefault(nexthop, []).append(recipient.address)
        if unroutable:
            self._record(envelope, unroutable, "error", self._delays(envelope, now, now))
        jobs = [
            Job(queue_id, nexthop, chunk, activated=now)
            for nexthop, addresses in groups.items()
            for chunk in batches(addresses, self.config.default_destination_recipient_limit)
        ]
        if not jobs:
            self._active.pop(queue_id, None)
            await self._persist(envelope)
            return
        self._outstanding[queue_id] = len(jobs)
        for job in jobs:
            self.scheduler.submit(job)

    def _domain(self, address: str) -> str:
        """The recipient's domain; a bare local part (``postmaster``) is local."""
        return domain_of(address) if "@" in address else self.config.myhostname.lower()

    # -- one delivery ------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        queue_id = job.queue_id
        envelope = self._active[queue_id]
        started = self.clock()
        try:
            outcome = await self._attempt(job, envelope)
        finally:
            self.scheduler.finished(job)
        delays = self._delays(envelope, job.activated, started, outcome)
        self._record(envelope, outcome.results, job.nexthop.transport, delays)
        remaining = self._outstanding[queue_id] - 1
        try:
            if remaining:
                self._outstanding[queue_id] = remaining
                await self.spool.update(envelope)
            else:
                del self._outstanding[queue_id]
                self._active.pop(queue_id, None)
                await self._persist(envelope)
        except SpoolError as error:
            # The spool keeps its older state: the message is retried, perhaps delivered twice.
            self.maillog.line("qmgr", f"warning: {queue_id}: cannot update queue file: {error}")
            if not remaining:
                self.scheduler.wait(queue_id, self.clock() + self.config.minimal_backoff_time)
        finally:
            self._wake.set()

    async def _attempt(self, job: Job, envelope: Envelope) -> DeliveryOutcome:
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
            )
            return await agent(request)
        except (TransientFailure, PermanentFailure) as failure:
            status = "bounced" if isinstance(failure, PermanentFailure) else "deferred"
            return DeliveryOutcome(results=[
                RecipientResult(r, status, failure.dsn, failure.text, failure.relay)
                for r in job.recipients
            ])
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - an agent bug defers, never loses mail
            self.maillog.line("qmgr", f"warning: {job.queue_id}: delivery agent failed: {error!r}")
            return DeliveryOutcome(results=[
                RecipientResult(r, "deferred", "4.3.0", f"delivery agent failed: {error}")
                for r in job.recipients
            ])

    def _delays(self, envelope: Envelope, activated: float, started: float,
                outcome: DeliveryOutcome | None = None) -> str:
        """Postfix's delays=a/b/c/d: before the active queue, in it, connection setup,
        transmission."""
        parts = (max(0.0, activated - envelope.arrival), max(0.0, started - activated),
                 outcome.connect_seconds if outcome else 0.0,
                 outcome.transfer_seconds if outcome else 0.0)
        return "/".join(format_delay(x) for x in parts)

    def _record(self, envelope: Envelope, results: list[RecipientResult], service: str,
                delays: str) -> None:
        """Apply each recipient's result to the envelope and log it in Postfix's words."""
        now = self.clock()
        by_address = {r.address: r for r in envelope.recipients if not r.final}
        for result in results:
            recipient = by_address.get(result.recipient)
            if recipient is None:
                continue
            status = result.status
            recipient.attempts += 1
            recipient.dsn = result.dsn
            recipient.last_reply = result.reply
            if status == "deferred":
                if now - envelope.arrival >= self.config.maximal_queue_lifetime:
                    status = "bounced"  # expired: Postfix returns it to the sender
                else:
                    recipient.next_attempt = now + backoff(
                        recipient.attempts, self.config.minimal_backoff_time,
                        self.config.maximal_backoff_time)
            recipient.status = status
            self.maillog.line(
                service,
                f"{envelope.queue_id}: to=<{result.recipient}>, relay={result.relay}, "
                f"delay={format_delay(now - envelope.arrival)}, delays={delays}, "
                f"dsn={result.dsn}, status={status} ({result.reply})")

    async def _persist(self, envelope: Envelope) -> None:
        """This round is over: remove the message when every recipient is final, else store
        the new states and wait for the earliest retry."""
        queue_id = envelope.queue_id
        if envelope.unfinished:
            await self.spool.update(envelope)
            self.scheduler.wait(queue_id, envelope.next_due)
        else:
            await self.spool.remove(queue_id)
            self.maillog.line("qmgr", f"{queue_id}: removed")
