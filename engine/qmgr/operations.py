"""Queue operations (tern queue hold / release / delete / requeue / flush), as postsuper and
postqueue do them, for the running queue manager and for one that is not started.

A mixin over QueueManager's state: an operation on a stored message reads it fresh and writes
it while it cannot be activated; one on an active message changes it in memory and leaves the
write to the message's settle. Trusts the operator (the control socket is the owner's only).
"""

import asyncio

from engine.smtp.grammar import domain_of
from engine.spool import Envelope


class QueueOperations:
    """Mixed into QueueManager: uses its spool, maillog, clock, _active, _busy, _touched,
    _doomed and _rescan()."""

    def _ids(self, queue_ids: list[str] | None) -> list[str]:
        """The named messages, or every queued one (active or not) for None."""
        if queue_ids is not None:
            return list(queue_ids)
        return sorted(set(self.spool.queue_ids()) | set(self._active))

    async def _operate(self, queue_ids: list[str] | None, act) -> list[str]:
        """Apply ``act(envelope, now)`` to each message: it edits the envelope and returns the
        postsuper log text ("" for none), REMOVE, or None when it does not apply. A stored
        message is read fresh and not activated while its write is in flight (its copy is
        private); an active one is changed in memory and its settle writes (or removes) it,
        even when the change comes during that write. Writes go out in chunks that share
        group commits; memory stays bounded by the chunk, whatever the queue size."""
        done: list[str] = []
        ids = self._ids(queue_ids)
        for start in range(0, len(ids), OPERATION_CHUNK):
            writes = []
            for queue_id in ids[start:start + OPERATION_CHUNK]:
                now = self.clock()
                active = self._active.get(queue_id)
                envelope = active or self.spool.envelope(queue_id)
                outcome = act(envelope, now) if envelope is not None else None
                if outcome is None:
                    continue
                if active is not None:
                    (self._doomed if outcome is REMOVE else self._touched).add(queue_id)
                    self._operated(queue_id, outcome, done, active=True)
                    continue
                self._busy.add(queue_id)
                write = (self.spool.remove(queue_id) if outcome is REMOVE
                         else self.spool.update(envelope))
                writes.append((queue_id, outcome, write))
            results = await asyncio.gather(*(w for _, _, w in writes), return_exceptions=True)
            for (queue_id, outcome, _), result in zip(writes, results, strict=True):
                self._busy.discard(queue_id)
                if isinstance(result, BaseException):
                    self.maillog.line("postsuper", f"warning: {queue_id}: {result}")
                else:
                    self._operated(queue_id, outcome, done, active=False)
        self._rescan()
        return done

    def _operated(self, queue_id: str, outcome, done: list[str], *, active: bool) -> None:
        done.append(queue_id)
        text = "removed" if outcome is REMOVE else outcome
        if text and not (active and outcome is REMOVE):  # qmgr logs that removal itself
            self.maillog.line("postsuper", f"{queue_id}: {text}")

    async def hold(self, queue_ids: list[str] | None) -> list[str]:
        """postsuper -h: keep the messages out of delivery until released."""
        return await self._operate(queue_ids, _hold)

    async def release(self, queue_ids: list[str] | None) -> list[str]:
        """postsuper -H: back into the queue, due now."""
        return await self._operate(queue_ids, _release)

    async def delete(self, queue_ids: list[str] | None, *,
                     deferred_only: bool = False) -> list[str]:
        """postsuper -d: remove the messages (an active one when its attempt ends)."""
        def act(envelope: Envelope, now: float):
            deferred = any(r.status == "deferred" for r in envelope.recipients)
            return REMOVE if deferred or not deferred_only else None

        return await self._operate(queue_ids, act)

    async def requeue(self, queue_ids: list[str] | None) -> list[str]:
        """postsuper -r: every unfinished recipient is due again now."""
        return await self._operate(queue_ids, _requeue)

    async def flush(self, domain: str | None = None) -> list[str]:
        """postqueue -f (every deferred message) or -s DOMAIN (those with a deferred
        recipient in DOMAIN): due now."""
        def act(envelope: Envelope, now: float):
            wanted = [r for r in envelope.recipients if r.status == "deferred"
                      and (domain is None or domain_of(r.address) == domain.lower())]
            if envelope.held or not wanted:
                return None
            for recipient in wanted:
                recipient.next_attempt = now
            return ""

        return await self._operate(None, act)


REMOVE = object()  # an operation's verdict: remove the message
OPERATION_CHUNK = 1000  # messages an operator command changes per round of commits


def _due_now(envelope: Envelope, now: float) -> None:
    for recipient in envelope.unfinished:
        recipient.next_attempt = now


def _hold(envelope: Envelope, now: float) -> str | None:
    if envelope.held:
        return None
    envelope.held = True
    return "placed on hold"


def _release(envelope: Envelope, now: float) -> str | None:
    if not envelope.held:
        return None
    envelope.held = False
    _due_now(envelope, now)
    return "released from hold"


def _requeue(envelope: Envelope, now: float) -> str | None:
    if not envelope.unfinished:
        return None
    _due_now(envelope, now)
    return "requeued"
