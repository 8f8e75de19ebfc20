"""The LMDB spool, with group commit.

Every write (new message, recipient states, removal) joins the current batch; one writer thread
commits a whole batch in one LMDB transaction and fsyncs once, then wakes every waiter. While a
commit is in flight the next batch fills, so under load many messages share one sync and an idle
server adds at most ``commit_window`` of latency. Trusts its callers (cleanup, qmgr), not data.

Room, as Postfix's slmdb.c: when the map is full the writer doubles it (up to ``map_size_limit``)
and retries. At the limit, or with the disk full, new messages are refused (SpoolFull) while the
updates and removals of the same batch are committed, with some headroom above the limit if they
need it: queued mail can always be finished, and freeing it makes room for new mail again.

Layout: one environment per shard directory, two databases keyed by queue ID:
``content`` (the message bytes as queued) and ``envelope`` (Envelope.encode()); and the due
index the queue manager schedules from, kept in the same transactions as the envelopes:
``schedule`` (8-byte big-endian due time in microseconds + queue ID → empty), and ``due``
(queue ID → its current 8-byte due time, to find and replace its schedule key).
"""

import asyncio
import errno
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb

from engine.spool import Envelope, QueuedMessage, SpoolError, SpoolFull

_PUT, _UPDATE, _REMOVE = "put", "update", "remove"
_PAGES_PER_CHANGE = 16  # headroom per update/removal at the limit: a B-tree path in each DB
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_MARGIN = 1 << 20  # an EIO with less free space than the commit plus this: disk full


def open_environment(path: Path, *, map_size: int, readonly: bool = False) -> lmdb.Environment:
    if not readonly:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as Postfix's queue
    return lmdb.open(
        str(path),
        mode=0o600,
        map_size=map_size,
        max_dbs=4,
        readonly=readonly,
        sync=True,
        metasync=True,
        lock=True,
        readahead=False,
    )


def _due_key(when: float) -> bytes:
    """A due time as an 8-byte big-endian count of microseconds: byte order is time order."""
    return struct.pack(">Q", max(0, int(when * 1_000_000)))


def _free_bytes(path: Path) -> int:
    try:
        fs = os.statvfs(path)
    except OSError:
        return -1
    return fs.f_bavail * fs.f_frsize


def _no_room(error: Exception, path: Path, ops: list[tuple]) -> str | None:
    """Why a commit of ``ops`` found no room (the map at its limit, the disk full); None when
    the error is another one."""
    if isinstance(error, lmdb.MapFullError):
        return "spool map is full"
    code = error.errno if isinstance(error, OSError) else getattr(error, "code", None)
    if isinstance(error, lmdb.DiskError) or code in _DISK_FULL:
        return "no space left on the spool file system"
    if code == errno.EIO:
        # LMDB reports a short write as EIO: the file system ran out of space midway.
        needed = sum(len(envelope or b"") + len(content or b"")
                     for _, _, content, envelope, _ in ops)
        if 0 <= _free_bytes(path) < needed + _DISK_FULL_MARGIN:
            return "no space left on the spool file system"
    return None


class LmdbSpool:
    """Spool (see engine.spool) over one LMDB environment: one shard.

    ``map_size`` is the map at start (or the space in use, if more); ``map_size_limit`` is how far
    it may grow for new messages (default: ``map_size``, no growth)."""

    def __init__(self, path: Path, *, map_size: int = 1 << 30, map_size_limit: int | None = None,
                 commit_window: float = 0.002, readonly: bool = False) -> None:
        self.path = Path(path)
        self._env = open_environment(self.path, map_size=map_size, readonly=readonly)
        # LMDB: the map may be resized only while this process has no transaction open. Writes
        # run in the writer thread, which also resizes; reads (on the caller's thread) hold this
        # lock for the length of their read transaction, so the two never overlap.
        self._remap_lock = threading.Lock()
        self.map_size = self._env.info()["map_size"]  # bytes mapped now
        self.map_size_limit = max(map_size_limit or map_size, self.map_size)
        create = not readonly
        self._content_db = self._env.open_db(b"content", create=create)
        self._envelope_db = self._env.open_db(b"envelope", create=create)
        self._schedule_db = self._env.open_db(b"schedule", create=create)
        self._due_db = self._env.open_db(b"due", create=create)
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
        await self._submit((_PUT, envelope.queue_id.encode(), message.whole(), envelope.encode(),
                            envelope.index_due))

    async def update(self, envelope: Envelope) -> None:
        # Encoded now, on the loop thread: the envelope may change while the batch waits.
        await self._submit((_UPDATE, envelope.queue_id.encode(), None, envelope.encode(),
                            envelope.index_due))

    async def remove(self, queue_id: str) -> None:
        await self._submit((_REMOVE, queue_id.encode(), None, None, None))

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
            return self._commit_growing(ops)
        except (lmdb.Error, OSError) as error:
            reason = _no_room(error, self.path, ops)
            if reason is None:
                raise
        # No room: refuse the new messages, keep what is queued moving (it frees room).
        refused: dict[int, SpoolError] = {
            id(op): SpoolFull(reason) for op in ops if op[0] == _PUT}
        changes = [op for op in ops if op[0] != _PUT]
        if changes:
            try:
                refused.update(self._commit_changes(changes))
            except (lmdb.Error, OSError) as error:
                reason = _no_room(error, self.path, changes)
                if reason is None:
                    raise
                refused.update({id(op): SpoolError(reason) for op in changes})
        return refused

    def _commit_growing(self, ops: list[tuple]) -> dict[int, SpoolError]:
        """Commit; when the map is full, double it up to the limit and try again (slmdb)."""
        while True:
            try:
                return self._commit(ops)
            except lmdb.MapFullError:
                if self._env.reader_check():
                    continue  # dead processes' readers held old pages, free now
                if self.map_size >= self.map_size_limit:
                    raise
                self._resize(min(self.map_size * 2, self.map_size_limit))

    def _commit_changes(self, changes: list[tuple]) -> dict[int, SpoolError]:
        """Commit updates and removals of queued mail; at the limit they may use headroom above
        it, for this one commit only: new messages never get it."""
        try:
            return self._commit_growing(changes)
        except lmdb.MapFullError:
            headroom = len(changes) * _PAGES_PER_CHANGE * self._env.stat()["psize"]
            base = max(self.map_size, self.map_size_limit)  # the space in use may exceed it
            self._resize(base + max(headroom, self.map_size_limit // 16))
            try:
                return self._commit(changes)
            finally:
                self._resize(self.map_size_limit)  # LMDB keeps at least the space in use

    def _resize(self, map_size: int) -> None:
        """Runs in the writer thread, between its transactions; waits out the readers."""
        with self._remap_lock:
            self._env.set_mapsize(map_size)
            self.map_size = self._env.info()["map_size"]

    def _commit(self, ops: list[tuple]) -> dict[int, SpoolError]:
        new_messages = 0
        refused: dict[int, SpoolError] = {}
        with self._env.begin(write=True) as txn:
            for op in ops:
                kind, key, content, envelope, due = op
                if kind == _REMOVE:
                    txn.delete(key, db=self._content_db)
                    txn.delete(key, db=self._envelope_db)
                    self._unschedule(txn, key)
                    continue
                if kind == _PUT:
                    # Never replace a queued message (a queue ID reused after a clock step).
                    if not txn.put(key, content, db=self._content_db, overwrite=False):
                        refused[id(op)] = SpoolError(f"queue ID {key.decode()} is in use")
                        continue
                    new_messages += 1
                if kind == _UPDATE:
                    if txn.get(key, db=self._envelope_db) is None:
                        continue  # removed meanwhile: a late update never recreates it
                    self._unschedule(txn, key)
                txn.put(key, envelope, db=self._envelope_db)
                if due is not None:
                    when = _due_key(due)
                    txn.put(when + key, b"", db=self._schedule_db)
                    txn.put(key, when, db=self._due_db)
        self.commits += 1
        self.messages_committed += new_messages
        return refused

    async def drain(self) -> None:
        """Wait until every submitted write is committed (or refused: its waiter has the error)."""
        while self._batch or self._in_flight is not None:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush()
            in_flight = self._in_flight
            if in_flight is not None and not in_flight.done():
                await asyncio.wait([in_flight])
            else:
                # A commit that is done still needs its callback (_finish), queued on the loop:
                # yield to it. Awaiting the done future would not yield, and this would spin.
                await asyncio.sleep(0)

    # -- reads: LMDB read transactions, never during a resize -------------------------------

    def envelopes(self) -> list[Envelope]:
        raws = self._read(self._envelope_db, lambda txn: [value for _, value in txn.cursor()])
        return [Envelope.decode(raw) for raw in raws]

    def queue_ids(self) -> list[str]:
        return self._read(self._envelope_db, lambda txn: [
            key.decode() for key in txn.cursor().iternext(keys=True, values=False)])

    def envelope(self, queue_id: str) -> Envelope | None:
        raw = self._read(self._envelope_db, lambda txn: txn.get(queue_id.encode()))
        return Envelope.decode(raw) if raw is not None else None

    def content(self, queue_id: str) -> bytes:
        raw = self._read(self._content_db, lambda txn: txn.get(queue_id.encode()))
        if raw is None:
            raise KeyError(queue_id)
        return raw

    def _read(self, db, read):
        """``read(txn)`` in one short read transaction; it must return copies (bytes), not
        buffers into the map, which a resize replaces."""
        with self._remap_lock:
            try:
                with self._env.begin(db=db) as txn:
                    return read(txn)
            except lmdb.MapResizedError:
                # Another process (the server, for `tern queue`) grew the map: adopt its size.
                self._env.set_mapsize(0)
                with self._env.begin(db=db) as txn:
                    return read(txn)

    def _unschedule(self, txn, key: bytes) -> None:
        when = txn.get(key, db=self._due_db)
        if when is not None:
            txn.delete(when + key, db=self._schedule_db)
            txn.delete(key, db=self._due_db)

    def scan_due(self, until: float, limit: int) -> list[str]:
        """Due-index order is key order: read from the start, stop past ``until`` or at
        ``limit``. O(limit), whatever the queue size."""
        bound = _due_key(until)

        def read(txn) -> list[str]:
            found: list[str] = []
            for key in txn.cursor().iternext(keys=True, values=False):
                if key[:8] > bound or len(found) >= limit:
                    break
                found.append(key[8:].decode())
            return found

        return self._read(self._schedule_db, read)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._env.close()
