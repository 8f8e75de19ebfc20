"""``tern queue summary``: the shape of the queue, as Postfix's ``qshape``.

A table of destination domains × message age (buckets of 5, 10, 20 … 1280 minutes and older),
counting the recipients still to be delivered, with a TOTAL row first and the busiest domains
next; or sender domains (counting messages); or the same as JSON. qshape's default is the
incoming and active queues; Tern has no separate incoming queue, so the default is every message
not on hold (active and deferred), and held mail only when asked for. Reads the spool read-only
(and asks the running server which messages are active). Trusts the spool's contents as written
by Tern.
"""

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from engine.cli.queue import active_ids, queue_name, read_queue
from engine.config import Config
from engine.spool import Envelope

BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # minutes: each column's upper bound
LABELS = ("T", *(str(limit) for limit in BUCKETS), f"{BUCKETS[-1]}+")
QUEUES = ("hold", "deferred", "active")
DEFAULT_QUEUES = ("deferred", "active")  # every message not on hold


def bucket(age_minutes: float) -> int:
    """The column of a message this old: the first bound it is below, else the last (older)."""
    for index, limit in enumerate(BUCKETS):
        if age_minutes < limit:
            return index
    return len(BUCKETS)


@dataclass
class Row:
    domain: str
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    @property
    def total(self) -> int:
        return sum(self.counts)


def _domain(address: str, config: Config) -> str:
    if not address:
        return "MAILER-DAEMON"
    return address.rpartition("@")[2].lower() if "@" in address else config.myhostname.lower()


def shape(envelopes: Iterable[Envelope], config: Config, now: float, *,
          senders: bool = False) -> list[Row]:
    """TOTAL first, then one row per domain, the most mail first (ties by name)."""
    rows: dict[str, Row] = {}
    total = Row("TOTAL")
    for envelope in envelopes:
        column = bucket(max(0.0, now - envelope.arrival) / 60)
        if senders:
            counted = Counter([_domain(envelope.sender, config)])
        else:
            counted = Counter(_domain(r.address, config) for r in envelope.unfinished)
        for domain, count in counted.items():
            rows.setdefault(domain, Row(domain)).counts[column] += count
            total.counts[column] += count
    return [total, *sorted(rows.values(), key=lambda row: (-row.total, row.domain))]


def format_table(rows: list[Row]) -> str:
    cells = [[row.domain, str(row.total), *map(str, row.counts)] for row in rows]
    header = ["", *LABELS]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "".join(" ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
                   + "\n" for line in [header, *cells])


def summarize(config: Config, out: TextIO, *, as_json: bool = False, senders: bool = False,
              queues: tuple[str, ...] = DEFAULT_QUEUES, now: float | None = None,
              err: TextIO | None = None) -> int:
    active = active_ids(config, err) if set(queues) - {"hold"} else frozenset()
    envelopes = [e for e in read_queue(config) if queue_name(e, active) in queues]
    rows = shape(envelopes, config, time.time() if now is None else now, senders=senders)
    if not as_json:
        out.write(format_table(rows))
        return 0
    total, *domains = rows
    out.write(json.dumps({
        "count": "messages" if senders else "recipients",
        "by": "sender_domain" if senders else "recipient_domain",
        "buckets": list(LABELS[1:]),
        "total": {"total": total.total, "counts": total.counts},
        "domains": [{"domain": row.domain, "total": row.total, "counts": row.counts}
                    for row in domains],
    }) + "\n")
    return 0
