"""The LMDB spool, with group commit.

Every write (new message, recipient states, removal) joins the current batch; one writer thread
commits a whole batch in one LMDB transaction and fsyncs once, then wakes every waiter. While a
commit is in flight the next batch fills, so under load many messages share one sync and an idle
server adds at most ``commit_window`` of latency. Trusts its callers (cleanup, qmgr), not data.

Layout: one environment per shard directory, two databases keyed by queue ID:
``content`` (the message bytes as queued) and ``envelope`` (Envelope.encode()).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb

from engine.spool import Envelope, QueuedMessage, SpoolError, SpoolFull

_PUT, _UPDATE, _REMOVE = "put", "update", "remove"


def open_environment(path: Path, *, map_size: int, readonly: bool = False) -> lmdb.Environment:
    if not readonly:
        path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(
        str(path),
        map_size=map_size,
        max_dbs=4,
        readonly=readonly,
        sync=True,
        metasync=True,
        lock=True,
        readahead=False,
    )


class LmdbSpool:
    """Spool (see engine.spool) over one LMDB environment: one shard."""

    def __init__(self, path: Path, *, map_size: int = 1 << 30, commit_window: float = 0.002,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        self._env = open_environment(self.path, map_size=map_size, readonly=readonly)
        create = not readonly
        self._content_db = self._env.open_db(b"content", create=create)
        self._envelope_db = self._env.open_db(b"envelope", create=create)
        self._window = commit_window
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-writer")
        self._batch: list[tuple[tuple, asyncio.Future]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._in_flight: asyncio.Future | None = None
        self.commits = 0  # transactions committed
        self.messages_committed = 0  # new messages in them: the group-commit figure

    # -- writes: all go through the batch ----------------------------------------------------

    async def enqueue(self, message: QueuedMessage) -> None:
        envelope = message.envelope
        await self._submit((_PUT, envelope.queue_id.encode(), message.content, envelope.encode()))

    async def update(self, envelope: Envelope) -> None:
        # Encoded now, on the loop thread: the envelope may change while the batch waits.
        await self._submit((_UPDATE, envelope.queue_id.encode(), None, envelope.encode()))

    async def remove(self, queue_id: str) -> None:
        await self._submit((_REMOVE, queue_id.encode(), None, None))

    def _submit(self, op: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._batch.append((op, done))
        if self._in_flight is None and self._flush_timer is None:
            if self._window > 0:
                self._flush_timer = loop.call_later(self._window, self._flush)
            else:
                self._flush_timer = loop.call_soon(self._flush)
        return done

    def _flush(self) -> None:
        self._flush_timer = None
        if self._in_flight is not None or not self._batch:
            return
        batch, self._batch = self._batch, []
        loop = asyncio.get_running_loop()
        self._in_flight = loop.run_in_executor(self._writer, self._write, [op for op, _ in batch])
        self._in_flight.add_done_callback(lambda written: self._finish(batch, written))

    def _finish(self, batch: list, written: asyncio.Future) -> None:
        self._in_flight = None
        error = written.exception()
        refused = {} if error else written.result()
        for op, done in batch:
            if done.done():
                continue
            if error is not None:
                done.set_exception(SpoolError(str(error)))
            elif id(op) in refused:
                done.set_exception(refused[id(op)])
            else:
                done.set_result(None)
        if self._batch:
            self._flush()

    def _write(self, ops: list[tuple]) -> dict[int, SpoolError]:
        """Runs in the writer thread. Returns the ops refused, by id, with their error."""
        try:
            return self._commit(ops)
        except lmdb.MapFullError:
            # Keep what we have: retry without the new messages (updates and removals free room).
            others = [op for op in ops if op[0] != _PUT]
            refused = self._commit(others) if others else {}
            refused.update({id(op): SpoolFull("spool map is full") for op in ops if op[0] == _PUT})
            return refused

    def _commit(self, ops: list[tuple]) -> dict[int, SpoolError]:
        new_messages = 0
        refused: dict[int, SpoolError] = {}
        with self._env.begin(write=True) as txn:
            for op in ops:
                kind, key, content, envelope = op
                if kind == _REMOVE:
                    txn.delete(key, db=self._content_db)
                    txn.delete(key, db=self._envelope_db)
                    continue
                if kind == _PUT:
                    # Never replace a queued message (a queue ID reused after a clock step).
                    if not txn.put(key, b"".join(content), db=self._content_db, overwrite=False):
                        refused[id(op)] = SpoolError(f"queue ID {key.decode()} is in use")
                        continue
                    new_messages += 1
                txn.put(key, envelope, db=self._envelope_db)
        self.commits += 1
        self.messages_committed += new_messages
        return refused

    async def drain(self) -> None:
        """Wait until every submitted write is committed."""
        while self._batch or self._in_flight is not None:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush()
            if self._in_flight is not None:
                await asyncio.shield(self._in_flight)
            else:
                await asyncio.sleep(0)

    # -- reads: lock-free LMDB read transactions ---------------------------------------------

    def envelopes(self) -> list[Envelope]:
        with self._env.begin(db=self._envelope_db) as txn:
            return [Envelope.decode(value) for _, value in txn.cursor()]

    def envelope(self, queue_id: str) -> Envelope | None:
        with self._env.begin(db=self._envelope_db) as txn:
            raw = txn.get(queue_id.encode())
        return Envelope.decode(raw) if raw is not None else None

    def content(self, queue_id: str) -> bytes:
        with self._env.begin(db=self._content_db) as txn:
            raw = txn.get(queue_id.encode())
        if raw is None:
            raise KeyError(queue_id)
        return raw

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._env.close()
