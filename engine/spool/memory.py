"""An in-memory spool with the same contract as the LMDB one, for tests of the stages above it.

Nothing here is durable; it exists so that smtpd, cleanup and qmgr tests need no disk.
"""

from engine.spool import Envelope, QueuedMessage


class MemorySpool:
    def __init__(self) -> None:
        self._content: dict[str, bytes] = {}
        self._envelopes: dict[str, bytes] = {}

    async def enqueue(self, message: QueuedMessage) -> None:
        queue_id = message.envelope.queue_id
        self._content[queue_id] = message.whole()
        self._envelopes[queue_id] = message.envelope.encode()

    async def update(self, envelope: Envelope) -> None:
        if envelope.queue_id in self._envelopes:  # removed meanwhile: never recreated
            self._envelopes[envelope.queue_id] = envelope.encode()

    async def remove(self, queue_id: str) -> None:
        self._content.pop(queue_id, None)
        self._envelopes.pop(queue_id, None)

    async def drain(self) -> None:
        return None

    def scan_due(self, until: float, limit: int) -> list[str]:
        due = []
        for envelope in self.envelopes():
            when = envelope.next_due
            if not envelope.held and when is not None and when <= until:
                due.append((when, envelope.queue_id))
        return [queue_id for _, queue_id in sorted(due)[:limit]]

    def queue_ids(self) -> list[str]:
        return list(self._envelopes)

    def envelopes(self) -> list[Envelope]:
        return [Envelope.decode(raw) for raw in self._envelopes.values()]

    def envelope(self, queue_id: str) -> Envelope | None:
        raw = self._envelopes.get(queue_id)
        return Envelope.decode(raw) if raw is not None else None

    def content(self, queue_id: str) -> bytes:
        return self._content[queue_id]

    def close(self) -> None:
        return None
