"""cleanup: turns one accepted transaction into a queued message, and hands it to the spool.

Every intake (smtpd now; the sendmail command and the HTTP API later) goes through ``Cleanup``:
it is the only stage that enqueues. Removes duplicate recipients, adds ``Received:`` (RFC 5321
§4.4) at the top and ``Message-ID:`` / ``Date:`` at the end of the header section when the
client left them out, as Postfix's cleanup does; enforces message_size_limit while bytes arrive
(past it, content is dropped, not buffered). Trusts its caller for the envelope; the content is
client data and only its header lines are inspected. Never does network I/O.
"""

import re
import time
from dataclasses import dataclass, field, replace

from engine.spool import Envelope, QueuedMessage, Recipient
from engine.spool.queue_id import QueueIdGenerator

#: A header field line or a folded continuation (RFC 5322 §2.2, §3.2.2), ending in LF.
_HEADER_LINE = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t])[^\n]*\n")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_DATE = re.compile(rb"^date[ \t]*:", re.IGNORECASE | re.MULTILINE)
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
HEADER_SIZE_LIMIT = 102400  # Postfix's header_size_limit: past it, the rest is body


def rfc5322_date(when: float) -> str:
    """``Sat, 21 Nov 2026 13:40:11 +0000`` in local time (RFC 5322 §3.3), without email.utils
    (which imports socket: cleanup stays free of I/O modules)."""
    local = time.localtime(when)
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[local.tm_wday]
    month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
             "Dec")[local.tm_mon - 1]
    return (f"{day}, {local.tm_mday:02d} {month} {local.tm_year} "
            f"{time.strftime('%H:%M:%S %z', local)}")


@dataclass
class Origin:
    """Who handed us the message: what the Received: header and the logs say about it."""

    client_name: str = "unknown"
    client_ip: str = ""
    helo: str | None = None
    esmtp: bool = False  # the client said EHLO
    tls: str = ""  # "TLSv1.3 with cipher …" once STARTTLS / SMTPS has completed
    sasl_username: str = ""  # set by a successful AUTH
    smtputf8: bool = False  # the current message was sent with MAIL FROM … SMTPUTF8
    local_protocol: str = ""  # not SMTP at all: "local" (Tern's own notices), "HTTP" …

    @property
    def client(self) -> str:
        return f"{self.client_name}[{self.client_ip}]"

    @property
    def protocol(self) -> str:
        """The Received: ``with`` keyword (RFC 3848, RFC 6531): SMTP, ESMTP, ESMTPS, ESMTPA,
        ESMTPSA, or UTF8SMTP… for a message sent with SMTPUTF8."""
        if self.local_protocol:
            return self.local_protocol
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.smtputf8 else "ESMTP"
        return base + ("S" if self.tls else "") + ("A" if self.sasl_username else "")


# Postfix's smtpd printable() (controls, C1 controls, bytes that were not UTF-8; UTF-8 text
# itself stays, as with smtputf8_enable) and then its NEUTER_CHARACTERS: what could end the
# Received: "from" clause or its "(name [addr])" comment, or start its date (";"). Not ":", so
# that an IPv6 address literal stays as sent (Postfix 3's set).
_HELO_NEUTER = re.compile(r'[\x00-\x20\x7f-\x9f\ud800-\udfff<>()\\";@]')


def neuter_helo(name: str) -> str:
    """The HELO/EHLO argument as it is kept for Received: and the logs: each control, space
    or special character becomes ``?`` (Postfix's helo_cmd), so that a client cannot write
    a trace of its choosing ("EHLO a.example (localhost [10.0.0.1]) by x;")."""
    return _HELO_NEUTER.sub("?", name)


def received_header(origin: Origin, hostname: str, queue_id: str, recipients: list[str],
                    when: float) -> bytes:
    """RFC 5321 §4.4 trace field, in Postfix's layout (with its "(using TLSv1.3 with cipher …)"
    line when the client used TLS)."""
    stamp = rfc5322_date(when)
    lines = [
        f"Received: from {origin.helo or origin.client_name} "
        f"({origin.client_name} [{origin.client_ip}])",
        *([f"\t(using {origin.tls})"] if origin.tls else []),
        f"\tby {hostname} (Tern) with {origin.protocol} id {queue_id}",
    ]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {stamp}")
    else:
        lines[-1] += f"; {stamp}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class RecipientRequest:
    """One accepted recipient and what its client asked for it (RFC 3461 §4.1 NOTIFY, §4.2
    ORCPT; "" when not given), as the Recipient fields of the queued envelope take them."""

    address: str
    notify: str = ""
    orcpt: str = ""


@dataclass
class MessageBuilder:
    """One message in the making. ``write`` each chunk, then ``finish``. Recipients may be
    given as plain addresses or as RecipientRequest; either way they are held as the latter."""

    queue_id: str
    sender: str
    recipients: list[RecipientRequest]  # accepts list[str | RecipientRequest]
    origin: Origin
    hostname: str
    size_limit: int
    body_8bit: bool = False
    # Postfix's hopcount_limit: a message whose Received: headers (ours included) reach it is
    # looping; too_many_hops says so once the header section has been seen (0 = no limit)
    hopcount_limit: int = 0
    too_many_hops: bool = False
    ret: str = ""  # RFC 3461 §4.3 RET (FULL / HDRS), "" when not given
    envid: str = ""  # RFC 3461 §4.4 ENVID (xtext as given)
    clock: object = time.time
    size: int = 0
    too_big: bool = False
    message_id: str = ""
    # the content as queued, built as it arrives: one buffer, so the spool stores it without a
    # joined copy (a large message is in memory once, never twice)
    _content: bytearray = field(default_factory=bytearray)
    _head: bytearray | None = field(default_factory=bytearray)  # None once headers are done
    _head_scanned: int = 0

    def __post_init__(self) -> None:
        first: dict[str, RecipientRequest] = {}
        for item in self.recipients:
            request = item if isinstance(item, RecipientRequest) else RecipientRequest(item)
            first.setdefault(request.address, request)  # duplicates: the first one's DSN wins
        self.recipients = list(first.values())
        self._started = self.clock()
        self._content += (
            received_header(self.origin, self.hostname, self.queue_id, list(first),
                            self._started))

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.too_big or (self.size_limit and self.size > self.size_limit):
            self.too_big = True
            self._content = bytearray()
            self._head = None
            return
        if self._head is None:
            self._content += chunk
            return
        self._head += chunk
        self._scan_headers(final=False)

    @property
    def _chunks(self) -> list[bytearray]:
        """The content so far as a list of pieces (one), for tests: [] when nothing is kept."""
        return [self._content] if self._content else []

    def finish(self) -> QueuedMessage:
        if self._head is not None:
            self._scan_headers(final=True)
        arrival = self.clock()
        envelope = Envelope(
            queue_id=self.queue_id,
            sender=self.sender,
            recipients=[Recipient(address=r.address, next_attempt=arrival, notify=r.notify,
                                  orcpt=r.orcpt) for r in self.recipients],
            arrival=arrival,
            size=len(self._content),
            client=self.origin.client,
            message_id=self.message_id,
            body_8bit=self.body_8bit,
            ret=self.ret,
            envid=self.envid,
            smtputf8=self.origin.smtputf8,
        )
        return QueuedMessage(envelope=envelope, content=[self._content])

    def _scan_headers(self, *, final: bool) -> None:
        """Find where the header section ends; once found, add what is missing there."""
        head = self._head
        pos = self._head_scanned
        while (match := _HEADER_LINE.match(head, pos)) is not None:
            pos = match.end()
        self._head_scanned = pos
        line_complete = head.find(b"\n", pos) >= 0
        if not (final or line_complete or len(head) > HEADER_SIZE_LIMIT):
            return  # the line at pos may still become a header
        headers, rest = bytes(head[:pos]), bytes(head[pos:])
        self._head = None
        if headers and not headers.endswith(b"\r\n"):
            headers = headers[:-1] + b"\r\n"
        self._content += headers
        self._count_hops(headers)
        self._content += self._missing_headers(headers)
        if rest and not rest.startswith((b"\r\n", b"\n")):
            self._content += b"\r\n"  # a body line came first: separate it from the headers
        if rest:
            self._content += rest

    def _count_hops(self, headers: bytes) -> None:
        """Postfix's cleanup counts the Received: headers, its own included (one scan of the
        header block, as for Message-ID and Date), against hopcount_limit: a mail loop ends
        there whatever routed it."""
        if self.hopcount_limit:
            hops = 1 + len(_RECEIVED.findall(headers))
            self.too_many_hops = hops >= self.hopcount_limit

    def _missing_headers(self, headers: bytes) -> bytes:
        added = []
        found = _MESSAGE_ID.search(headers)
        if found:
            self.message_id = found.group(1).decode("utf-8", "replace").strip()
        else:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self._started))
            self.message_id = f"<{stamp}.{self.queue_id}@{self.hostname}>"
            added.append(f"Message-Id: {self.message_id}\r\n")
        if _DATE.search(headers) is None:
            added.append(f"Date: {rfc5322_date(self._started)}\r\n")
        return "".join(added).encode()


class Cleanup:
    """The hand-off from intake to the spool, shared by every session of every listener.
    It issues the queue IDs, so every message of a shard has one from the same sequence."""

    def __init__(self, spool, maillog, config, on_queued=lambda envelope: None,
                 new_queue_id=None, clock=time.time) -> None:
        self.spool = spool
        self.maillog = maillog
        self.config = config
        self.on_queued = on_queued
        self.new_queue_id = new_queue_id or QueueIdGenerator()
        self.clock = clock  # the queue manager's clock: arrival and first attempt times

    def begin(self, *, queue_id: str, sender: str, recipients: list[str | RecipientRequest],
              origin: Origin, body_8bit: bool = False, ret: str = "",
              envid: str = "") -> MessageBuilder:
        """A builder for one message; ``ret`` / ``envid`` and each RecipientRequest's NOTIFY /
        ORCPT are the client's RFC 3461 DSN request, kept in the queued envelope."""
        return MessageBuilder(queue_id=queue_id, sender=sender, recipients=recipients,
                              origin=origin, hostname=self.config.myhostname,
                              size_limit=self.config.message_size_limit, body_8bit=body_8bit,
                              hopcount_limit=self.config.hopcount_limit, ret=ret, envid=envid,
                              clock=self.clock)

    async def enqueue(self, builder: MessageBuilder) -> Envelope:
        """Commit the message (returns once synced), log it and tell the queue manager.
        Raises engine.spool.SpoolFull / SpoolError: nothing is queued then."""
        message = builder.finish()
        await self.spool.enqueue(message)
        envelope = message.envelope
        self.maillog.line("cleanup", f"{envelope.queue_id}: message-id={envelope.message_id}")
        self.on_queued(envelope)
        return envelope

    async def inject(self, sender: str, recipients: list[str | RecipientRequest],
                     content: bytes, origin: Origin | None = None, *, smtputf8: bool = False,
                     ret: str = "", envid: str = "") -> Envelope:
        """Queue a message Tern made itself (a bounce, a delay or success notice, a copy that
        local forwards): the same path as mail from a client, with Tern as the origin.
        ``smtputf8``: queued as if sent with SMTPUTF8 (a notice about a message that was, as
        Postfix's bounce(8) posts it), so its delivery asks for SMTPUTF8 when its addresses or
        headers need it. ``ret`` / ``envid`` and RecipientRequests: a DSN request carried on."""
        origin = origin or Origin(client_name="localhost", client_ip="127.0.0.1",
                                  local_protocol="local")
        if smtputf8:
            origin = replace(origin, smtputf8=True)
        builder = self.begin(queue_id=self.new_queue_id(), sender=sender,
                             recipients=recipients, origin=origin, body_8bit=True, ret=ret,
                             envid=envid)
        builder.size_limit = 0  # our own notice is never refused for size
        builder.write(content)
        return await self.enqueue(builder)
