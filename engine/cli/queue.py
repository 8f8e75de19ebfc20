"""``tern queue list``: the queue in mailq's layout (or postqueue -j style JSON lines), and
the shard reading every ``tern queue`` command shares.

Reads every spool shard through LMDB read-only transactions, so it works while the server runs
and never blocks it; which messages are in the active queue (being delivered now) only the
running server knows, so that is asked through its control sockets (engine.control; one per
worker, each knowing its own): with no server running, none is. Trusts the spool's contents
as written by Tern.
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from engine import control
from engine.config import Config
from engine.spool import FINAL, Envelope
from engine.spool.lmdb_spool import LmdbSpool

ACTIVE_TIMEOUT = 10.0  # seconds the server gets to say which messages are active


class NoSuchMessage(Exception):
    """A queue ID named on the command line is not in the queue (exit status 1)."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"{queue_id}: no such message")
        self.queue_id = queue_id


def shard_paths(config: Config) -> list[Path]:
    """Every spool shard under the queue directory (one per worker: ``shard0``, ``shard1``…)."""
    root = Path(config.queue_directory)
    return [shard for shard in sorted(root.glob("shard*")) if (shard / "data.mdb").exists()]


@contextmanager
def open_shard(config: Config, shard: Path) -> Iterator[LmdbSpool]:
    """One shard, read-only."""
    spool = LmdbSpool(shard, map_size=config.queue_map_size, readonly=True)
    try:
        yield spool
    finally:
        spool.close()


def read_queue(config: Config) -> list[Envelope]:
    envelopes: list[Envelope] = []
    for shard in shard_paths(config):
        with open_shard(config, shard) as spool:
            envelopes.extend(spool.envelopes())
    return sorted(envelopes, key=lambda e: (e.arrival, e.queue_id))


def shard_number(shard: Path) -> int | None:
    """``shard3`` → 3; None for a directory not named as a shard."""
    digits = shard.name.removeprefix("shard")
    return int(digits) if digits.isdigit() else None


def active_ids(config: Config, err: TextIO | None = None) -> frozenset[str]:
    """The queue IDs in the running server's active queues (each worker's queue manager holds
    those of its shard: being delivered now); none when no server runs. When a worker answers
    but cannot say, a warning on ``err`` and none of its."""
    directory = Path(config.queue_directory)
    active: set[str] = set()
    for name in control.socket_names(directory):
        try:
            active.update(control.request(directory, "active", timeout=ACTIVE_TIMEOUT,
                                          name=name))
        except control.ControlUnavailable:
            continue  # left by a server that died
        except control.ControlError as error:
            if err is not None:
                err.write(f"tern: warning: cannot ask the server for its active queue: "
                          f"{error}\n")
    return frozenset(active)


def queue_name(envelope: Envelope, active: frozenset[str] = frozenset()) -> str:
    """Postfix's name for where the message is: hold, active (in ``active``, the running
    server's active queue) or deferred (waiting in the spool, new mail too: Tern has no
    separate incoming queue)."""
    if envelope.held:
        return "hold"
    if envelope.queue_id in active:
        return "active"
    return "deferred"


def json_record(envelope: Envelope, active: frozenset[str] = frozenset(), *,
                finished: bool = True) -> dict:
    """The envelope with postqueue -j's keys added (queue_name, arrival_time, message_size,
    each recipient's delay_reason), so tools written for Postfix read it too. Without
    ``finished``, only the recipients still to be delivered (pending, deferred), as postqueue
    -j lists them; sent and bounced ones are left out."""
    record = {"queue_name": queue_name(envelope, active), **asdict(envelope),
              "arrival_time": int(envelope.arrival), "message_size": envelope.size}
    if not finished:
        record["recipients"] = [r for r in record["recipients"] if r["status"] not in FINAL]
    for recipient in record["recipients"]:
        if recipient["status"] == "deferred" and recipient["last_reply"]:
            recipient["delay_reason"] = recipient["last_reply"]
    return record


def format_mailq(envelopes: list[Envelope], active: frozenset[str] = frozenset()) -> str:
    """Postfix's mailq: ID (``*`` in the active queue, ``!`` held), size, arrival, sender; then
    each unfinished recipient, preceded by the reason in parentheses when it was deferred."""
    if not envelopes:
        return "Mail queue is empty\n"
    lines = ["-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for envelope in envelopes:
        total += envelope.size
        mark = {"hold": "!", "active": "*"}.get(queue_name(envelope, active), "")
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(envelope.arrival))
        lines.append(f"{envelope.queue_id + mark:<11} {envelope.size:>8} {arrival}  "
                     f"{envelope.sender or 'MAILER-DAEMON'}")
        for recipient in envelope.unfinished:
            if recipient.status == "deferred" and recipient.last_reply:
                lines.append(f"({recipient.last_reply})")
            lines.append(" " * 41 + recipient.address)
        lines.append("")
    count = len(envelopes)
    plural = "s" if count > 1 else ""
    lines.append(f"-- {(total + 1023) // 1024} Kbytes in {count} Request{plural}.")
    return "\n".join(lines) + "\n"


def list_queue(config: Config, out: TextIO, *, as_json: bool = False,
               err: TextIO | None = None) -> int:
    active = active_ids(config, err)
    envelopes = read_queue(config)
    if as_json:
        for envelope in envelopes:
            out.write(json.dumps(json_record(envelope, active, finished=False)) + "\n")
    else:
        out.write(format_mailq(envelopes, active))
    return 0
