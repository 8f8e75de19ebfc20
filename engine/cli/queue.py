"""``tern queue list``: the queue in mailq's layout (or postqueue -j style JSON lines), and
the shard reading every ``tern queue`` command shares.

Reads every spool shard through LMDB read-only transactions, so it works while the server runs
and never blocks it. Trusts the spool's contents as written by Tern.
"""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from engine.config import Config
from engine.spool import Envelope
from engine.spool.lmdb_spool import LmdbSpool


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


def queue_name(envelope: Envelope) -> str:
    """Postfix's name for where the message is: hold, deferred (a recipient waits for a retry)
    or active (due now)."""
    if envelope.held:
        return "hold"
    if any(r.status == "deferred" for r in envelope.unfinished):
        return "deferred"
    return "active"


def json_record(envelope: Envelope) -> dict:
    """The envelope with postqueue -j's keys added (queue_name, arrival_time, message_size,
    each recipient's delay_reason), so tools written for Postfix read it too."""
    record = {"queue_name": queue_name(envelope), **asdict(envelope),
              "arrival_time": int(envelope.arrival), "message_size": envelope.size}
    for recipient in record["recipients"]:
        if recipient["status"] == "deferred" and recipient["last_reply"]:
            recipient["delay_reason"] = recipient["last_reply"]
    return record


def format_mailq(envelopes: list[Envelope]) -> str:
    """Postfix's mailq: ID (``!`` held), size, arrival, sender; then each unfinished recipient,
    preceded by the reason in parentheses when it was deferred."""
    if not envelopes:
        return "Mail queue is empty\n"
    lines = ["-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for envelope in envelopes:
        total += envelope.size
        mark = "!" if envelope.held else ""
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


def list_queue(config: Config, out: TextIO, *, as_json: bool = False) -> int:
    envelopes = read_queue(config)
    if as_json:
        for envelope in envelopes:
            out.write(json.dumps(json_record(envelope)) + "\n")
    else:
        out.write(format_mailq(envelopes))
    return 0
