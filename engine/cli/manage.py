"""``tern queue hold|release|delete|requeue|flush``: Postfix's postsuper -h/-H/-d/-r and
postqueue -f/-s.

Each change is one call of the queue manager's method of that name, shard by shard (a message
lives in exactly one). While a server runs, the call is made inside the worker that owns the
shard, through its control socket (engine.control), so its schedule follows at once; for a shard
no worker answers for (no server runs, or its worker is being restarted), the same method runs
here on a QueueManager over that spool shard that is never started, and the next start reads
the result from the spool. Named queue IDs are
looked up first: one that is not queued is an error (exit status 1); the others are still
acted on. Trusts the administrator at the terminal.
"""

import asyncio
from pathlib import Path
from typing import TextIO

import lmdb

from engine import control
from engine.cli.queue import NoSuchMessage, open_shard, shard_number, shard_paths
from engine.config import Config
from engine.log import Maillog
from engine.qmgr.manager import QueueManager
from engine.spool import SpoolError
from engine.spool.lmdb_spool import LmdbSpool

# postsuper's words for what was done, as it prints them when it is done
DONE = {"hold": "Placed on hold", "release": "Released from hold", "delete": "Deleted",
        "requeue": "Requeued"}


class OperationFailed(Exception):
    """The server refused or failed the operation, or the spool could not be changed."""


def locate(config: Config, queue_ids: list[str]) -> tuple[dict[Path, list[str]], list[str]]:
    """Which shard holds each named message, and the names not queued anywhere."""
    by_shard: dict[Path, list[str]] = {}
    remaining = list(dict.fromkeys(queue_ids))
    for shard in shard_paths(config):
        with open_shard(config, shard) as spool:
            here = [queue_id for queue_id in remaining if spool.envelope(queue_id) is not None]
        if here:
            by_shard[shard] = here
            remaining = [queue_id for queue_id in remaining if queue_id not in here]
    return by_shard, remaining


async def _call(qmgr: QueueManager, op: str, queue_ids: list[str] | None,
                arguments: dict) -> list[str]:
    if op == "flush":
        return await qmgr.flush(**arguments)
    return await getattr(qmgr, op)(queue_ids, **arguments)


async def _offline(config: Config, op: str, by_shard: dict[Path, list[str] | None],
                   arguments: dict) -> list[str]:
    """The operation on each shard's spool, by a queue manager that is never started."""
    try:
        maillog = Maillog(config.myhostname, config.maillog_file)
    except OSError as error:
        raise OperationFailed(f"maillog_file {config.maillog_file}: {error.strerror}") from error
    affected: list[str] = []
    try:
        for shard, queue_ids in by_shard.items():
            try:
                spool = LmdbSpool(shard, map_size=config.queue_map_size,
                                  map_size_limit=config.queue_map_size_limit,
                                  commit_window=config.queue_commit_window)
            except (OSError, lmdb.Error) as error:
                raise OperationFailed(f"{shard}: cannot open the spool: "
                                      f"{getattr(error, 'strerror', None) or error}") from error
            try:
                qmgr = QueueManager(spool, config, maillog, agents={})
                affected += await _call(qmgr, op, queue_ids, arguments)
                await spool.drain()
            except SpoolError as error:
                raise OperationFailed(f"{shard}: {error}") from error
            finally:
                spool.close()
    finally:
        maillog.close()
    return affected


def perform(config: Config, op: str, queue_ids: list[str] | None,
            **arguments) -> tuple[list[str], list[str]]:
    """``op`` on the named messages (None = ALL), in the running server or else on the spool;
    ``arguments`` are the method's others (delete: deferred_only; flush: domain). Returns the
    queue IDs affected and the named ones that are not queued."""
    missing: list[str] = []
    if queue_ids is None:
        by_shard: dict[Path, list[str] | None] = dict.fromkeys(shard_paths(config))
    else:
        found, missing = locate(config, queue_ids)
        by_shard = dict(found)
        queue_ids = [queue_id for ids in found.values() for queue_id in ids]
        if not queue_ids:
            return [], missing
    affected: list[str] = []
    offline: dict[Path, list[str] | None] = {}
    for shard, shard_ids in by_shard.items():
        try:
            affected += _online(config, shard, op, shard_ids, arguments)
        except control.ControlUnavailable:
            offline[shard] = shard_ids
        except control.ControlError as error:
            raise OperationFailed(str(error)) from error
    if offline:
        affected += asyncio.run(_offline(config, op, offline, arguments))
    return affected, missing


def _online(config: Config, shard: Path, op: str, queue_ids: list[str] | None,
            arguments: dict) -> list[str]:
    """The operation in the server's worker that owns ``shard``. Raises ControlUnavailable
    when none answers for it."""
    number = shard_number(shard)
    if number is None:
        raise control.ControlUnavailable(f"{shard}: not a shard of a worker")
    ids = {} if op == "flush" else {"ids": queue_ids}
    unavailable = control.ControlUnavailable(f"no server answers for {shard}")
    for name in control.shard_sockets(number):
        try:
            return control.request(Path(config.queue_directory), op, name=name, **ids,
                                   **arguments)
        except control.ControlUnavailable as error:
            unavailable = error
    raise unavailable


def run_operation(config: Config, op: str, queue_ids: list[str] | None, err: TextIO,
                  **arguments) -> int:
    """The command: report what was done as postsuper does ("Deleted: 2 messages")."""
    try:
        affected, missing = perform(config, op, queue_ids, **arguments)
    except OperationFailed as error:
        err.write(f"tern: fatal: {op}: {error}\n")
        return 1
    for queue_id in missing:
        err.write(f"tern: {NoSuchMessage(queue_id)}\n")
    if affected and op in DONE:
        plural = "s" if len(affected) != 1 else ""
        err.write(f"tern: {DONE[op]}: {len(affected)} message{plural}\n")
    return 1 if missing else 0
