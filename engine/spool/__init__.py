"""The spool: durable storage of accepted messages and of each recipient's delivery state.

The contract is ``Spool`` below (as slimta's QueueStorage): small enough to hold in one's head,
with LMDB behind it (engine.spool.lmdb_spool) and an in-memory one for tests. It makes no policy
decisions; it stores what cleanup and the queue manager give it and says when it is durable.
"""

import json
from dataclasses import dataclass, field
from typing import Literal, Protocol

RecipientStatus = Literal["pending", "deferred", "sent", "bounced"]
FINAL: frozenset[str] = frozenset({"sent", "bounced"})


class SpoolError(Exception):
    """The spool could not store the change; nothing it already had is harmed."""


class SpoolFull(SpoolError):
    """No room (map or disk full): new mail gets 452 4.3.1."""


@dataclass
class Recipient:
    address: str
    status: RecipientStatus = "pending"
    next_attempt: float = 0.0  # when a deferred recipient is due again (epoch seconds)
    attempts: int = 0
    last_reply: str = ""  # the reason shown by `tern queue list` and in bounces
    dsn: str = ""
    relay: str = ""  # "host[ip]:port" of the last attempt: Remote-MTA in a DSN
    # RFC 3461 per-recipient DSN request: NOTIFY ("" = default: FAILURE,DELAY) and ORCPT
    notify: str = ""
    orcpt: str = ""
    warned: bool = False  # a delay warning went out for this recipient
    notified: bool = False  # its final notice (bounce / success), if owed, went out

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass
class Envelope:
    """Everything about a queued message except its content."""

    queue_id: str
    sender: str
    recipients: list[Recipient]
    arrival: float  # epoch seconds when the message was committed
    size: int  # bytes of content as queued
    client: str = ""  # "name[ip]" of the submitting client
    message_id: str = ""
    body_8bit: bool = False
    held: bool = False
    # RFC 3461 per-message DSN request: RET (FULL / HDRS, "" = not given) and ENVID
    ret: str = ""
    envid: str = ""
    notice_retry: float = 0.0  # a notice could not be queued: try again then (0 = none owed)
    # RFC 6531: sent with MAIL FROM … SMTPUTF8, so a next hop without SMTPUTF8 cannot take it
    # (5.6.7). Envelopes stored before this field decode with its default.
    smtputf8: bool = False

    def encode(self) -> bytes:
        # vars(), not dataclasses.asdict: asdict deep-copies every field (12% of the event
        # loop's time under load, bench/README.md "Profile under load")
        fields = dict(vars(self))
        fields["recipients"] = [vars(recipient) for recipient in self.recipients]
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Envelope":
        data = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)

    @property
    def unfinished(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.final]

    @property
    def index_due(self) -> float | None:
        """The due-index key: None (not indexed) when held or when nothing is left to do."""
        return None if self.held else self.next_due

    @property
    def next_due(self) -> float | None:
        """When this message has work again: the earliest unfinished recipient's attempt time,
        or the retry of a notice that could not be queued."""
        times = [r.next_attempt for r in self.recipients if not r.final]
        if self.notice_retry:
            times.append(self.notice_retry)
        return min(times) if times else None


@dataclass
class QueuedMessage:
    """What cleanup hands to the spool: the envelope and the content chunks to concatenate."""

    envelope: Envelope
    content: list[bytes] = field(default_factory=list)

    def whole(self) -> bytes | bytearray:
        """The content in one buffer: the only piece itself when there is one (cleanup's
        case: no second copy of a large message), else the pieces joined."""
        content = self.content
        return content[0] if len(content) == 1 else b"".join(content)


class Spool(Protocol):
    """The storage contract every spool keeps."""

    async def enqueue(self, message: QueuedMessage) -> None:
        """Store the message; return only once it is committed and synced (may be grouped
        with other messages into one transaction). Raises SpoolFull / SpoolError."""

    async def update(self, envelope: Envelope) -> None:
        """Persist new recipient states (after a delivery attempt). An update of a message
        that was removed meanwhile is dropped: it never recreates the message."""

    async def remove(self, queue_id: str) -> None:
        """Delete envelope and content (every recipient is final)."""

    def scan_due(self, until: float, limit: int) -> list[str]:
        """At most ``limit`` queue IDs from the due index, earliest first, due at or before
        ``until``. The index holds every message not on hold, keyed by Envelope.next_due, and
        follows each write: the queue manager's schedule lives here, not in memory."""

    def queue_ids(self) -> list[str]:
        """Every queued message's ID (without decoding the envelopes)."""

    def envelopes(self) -> list[Envelope]:
        """Every queued envelope (`tern queue`)."""

    def envelope(self, queue_id: str) -> Envelope | None:
        """One envelope, or None."""

    def content(self, queue_id: str) -> bytes:
        """The message content as queued (headers and body, CRLF line ends)."""

    async def drain(self) -> None:
        """Wait until every submitted write is committed."""

    def close(self) -> None:
        """Release the storage; pending writes are finished first."""
