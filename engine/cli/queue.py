"""``tern queue list``: the queue in mailq's layout (or postqueue -j style JSON lines).

Reads every spool shard through LMDB read-only transactions, so it works while the server runs
and never blocks it. Trusts the spool's contents as written by Tern.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from engine.config import Config
from engine.spool import Envelope
from engine.spool.lmdb_spool import LmdbSpool


def read_queue(config: Config) -> list[Envelope]:
    root = Path(config.queue_directory)
    envelopes: list[Envelope] = []
    for shard in sorted(root.glob("shard*")):
        if not (shard / "data.mdb").exists():
            continue
        spool = LmdbSpool(shard, map_size=config.queue_map_size, readonly=True)
        try:
            envelopes.extend(spool.envelopes())
        finally:
            spool.close()
    return sorted(envelopes, key=lambda e: (e.arrival, e.queue_id))


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
            out.write(json.dumps(asdict(envelope)) + "\n")
    else:
        out.write(format_mailq(envelopes))
    return 0
