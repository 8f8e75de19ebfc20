"""Sans-I/O SMTP client core: reads server replies and says what to send next (RFC 5321, 2920).

The h11 pattern: no sockets, no awaits, no clocks. The adapter (engine.delivery.smtp) moves the
bytes and applies the stage timeouts. Trusts nothing the server sends: replies are parsed under a
size cap, and a malformed reply ends the connection as a lost one would.

Everything that decides what comes next lives in ``Client._ON_REPLY`` (one handler per command
whose reply is awaited) and the few methods it names. The adapter's loop::

    while not isinstance(event := client.next_event(), Closed):
        Send(data, stage)      -> write data (timeout for stage)
        NeedData(stage)        -> read; client.receive_data(bytes) (b"" at EOF); on timeout,
                                  client.timed_out()
        Ready(...)             -> client.start_transaction(envelope)   (or client.quit())
        TransactionDone(...)   -> per-recipient results; client.quit() (or another transaction)
        SessionFailed(...)     -> the session never got ready: try the next server
        ReuseFailed(...)       -> a reused session was dead: send the envelope on a new one

Every transaction after a connection's first starts with RSET, which also tells whether a cached
session still works (Postfix's RSET probe): a reused session that fails before the server
answered MAIL FROM has delivered nothing, and says so with ReuseFailed instead of results.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum

from engine.delivery import RecipientResult
from engine.delivery.mime7bit import downgrade
from engine.smtp.reader import LineTooLong
from engine.smtp.replies import Reply
from engine.smtp.sasl_client import SaslLogin, choose, exchange, filtered, offered
from engine.speedups import Reader


class LocalProtocolError(Exception):
    """The caller used the client out of turn or passed a value that would corrupt the dialogue."""


class RemoteProtocolError(Exception):
    """The server sent something that is not an SMTP reply (handled inside the core)."""


class Stage(StrEnum):
    """What the client waits for (or writes); the adapter maps each to a Config timeout."""

    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # waiting for 354
    BODY = "body"  # writing the message content
    DOT = "dot"  # waiting for the reply to the final "."
    BDAT = "bdat"  # waiting for the reply to a BDAT chunk (RFC 3030)
    RSET = "rset"
    QUIT = "quit"
    STARTTLS = "starttls"
    AUTH = "auth"  # SASL (RFC 4954): the AUTH command and each challenge response


# Postfix's words for "lost connection with H while …" / "conversation with H timed out while …".
DOING = {
    Stage.GREETING: "receiving the initial server greeting",
    Stage.EHLO: "performing the EHLO handshake",
    Stage.HELO: "performing the HELO handshake",
    Stage.MAIL: "sending MAIL FROM",
    Stage.RCPT: "sending RCPT TO",
    Stage.DATA: "sending DATA command",
    Stage.BODY: "sending message body",
    Stage.DOT: "sending end of data -- message may be sent more than once",
    Stage.BDAT: "sending BDAT -- message may be sent more than once",
    Stage.RSET: "sending RSET",
    Stage.QUIT: "sending QUIT",
    Stage.STARTTLS: "sending STARTTLS",
    Stage.AUTH: "sending AUTH command",
}

# Postfix's "(in reply to … command)".
COMMAND = {
    Stage.EHLO: "EHLO",
    Stage.HELO: "HELO",
    Stage.MAIL: "MAIL FROM",
    Stage.RCPT: "RCPT TO",
    Stage.DATA: "DATA",
    Stage.DOT: "end of DATA",
    Stage.BDAT: "BDAT",
    Stage.RSET: "RSET",
    Stage.QUIT: "QUIT",
    Stage.STARTTLS: "STARTTLS",
    Stage.AUTH: "AUTH",
}

# RFC 3463 §2: status-code = class "." subject "." detail, at the start of the reply text.


class ReplyBuffer:
    """Receive buffer that yields whole (multi-line) replies. Lines come from the server's input
    reader (engine.speedups.Reader: each byte scanned once, CRLF or bare LF); this class only
    assembles them into replies. A reply larger than ``max_size`` bytes is an error."""

    __slots__ = ("_reader", "_lines", "_size", "_max")

    def __init__(self, max_size: int = 65536) -> None:
        self._reader = Reader(max_line_length=max_size)
        self._lines: list[str] = []
        self._size = 0  # bytes of the reply so far, line ends included
        self._max = max_size

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    @property
    def pending(self) -> bool:
        """Whether bytes were received that no complete reply has consumed yet."""
        return bool(len(self._reader) or self._lines)

    def read_reply(self) -> Reply | None:
        """The next complete reply, or None while incomplete. Raises RemoteProtocolError."""
        reader = self._reader
        while True:
            buffered = len(reader)
            try:
                line = reader.read_line()
            except LineTooLong:
                raise RemoteProtocolError("reply too long") from None
            if line is None:
                if self._size + len(reader) > self._max:
                    raise RemoteProtocolError("reply too long")
                return None
            self._size += buffered - len(reader)
            if self._size > self._max:
                raise RemoteProtocolError("reply too long")
            # RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
            #                   Reply-code [ SP textstring ] CRLF
            if len(line) < 3 or not line[:3].isdigit() or line[0] not in b"12345":
                raise RemoteProtocolError(f"malformed reply line {line[:40]!r}")
            sep = line[3:4]
            if sep not in (b"", b" ", b"-"):
                raise RemoteProtocolError(f"malformed reply line {line[:40]!r}")
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if sep == b"-":
                continue
            reply = Reply(int(line[:3]), "\n".join(self._lines))
            self._lines = []
            self._size = 0
            return reply


_STRAY_CR = re.compile(rb"\r(?!\n)")  # a CR that does not begin a CRLF


def dot_stuff(content: bytes) -> bytes:
    """The DATA payload for ``content``, without the final ".\\r\\n": CRLF line ends (a bare LF
    becomes CRLF, RFC 5321 §2.3.8; a bare CR becomes a space, as Postfix 3.9's
    cleanup_replace_stray_cr_lf, so no next hop can read ``<CR>.<CR>`` as an end of data and
    take what follows as a smuggled transaction), a dot doubled at the start of every line
    (§4.5.2), and a final CRLF. A few C-level passes over the bytes, never a Python loop per
    line."""
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf:  # a stray CR becomes a space (cleanup_replace_stray_cr_lf)
        content = _STRAY_CR.sub(b" ", content)
    if content.count(b"\n") != crlf:
        content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def bdat_chunks(content: bytes, chunk_size: int) -> list[bytes]:
    """The BDAT commands with their chunks for ``content`` (RFC 3030): CRLF line ends as for
    DATA and a final CRLF, but no dot-stuffing and no ".". At most ``chunk_size`` bytes a
    chunk; the last one says LAST (an empty message is one "BDAT 0 LAST")."""
    if content.count(b"\n") != content.count(b"\r\n"):
        content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    pieces = [content[i:i + chunk_size] for i in range(0, len(content), chunk_size)] or [b""]
    last = len(pieces) - 1
    return [
        f"BDAT {len(piece)}{' LAST' if i == last else ''}\r\n".encode() + piece
        for i, piece in enumerate(pieces)
    ]


def needs_smtputf8(envelope: Envelope) -> bool:
    """Whether the message cannot go without SMTPUTF8: the sender asked for it (RFC 6531) and
    the envelope or the header section holds non-ASCII text (Postfix's SMTPUTF8_FLAG_SENDER /
    RECIPIENT / HEADER). A request with nothing but ASCII goes on without it, as in Postfix."""
    if not envelope.smtputf8:
        return False
    if not envelope.sender.isascii() or not all(r.isascii() for r in envelope.recipients):
        return True
    content = envelope.content
    end = content.find(b"\n\n")
    crlf_end = content.find(b"\r\n\r\n")
    if end < 0 or (0 <= crlf_end < end):
        end = crlf_end
    headers = content if end < 0 else content[:end]
    return not headers.isascii()


@dataclass(frozen=True)
class Envelope:
    """One transaction: envelope sender (may be ""), recipients, the message as stored, and the
    RFC 3461 DSN request (sent only to a server that offers DSN): RET and ENVID for MAIL FROM,
    NOTIFY and ORCPT per recipient address for RCPT TO ("" or no entry: the parameter is left
    out). The values go out as given (xtext where the RFC says so). ``smtputf8``: the sender
    asked for SMTPUTF8 (RFC 6531), as the spool records it."""

    sender: str
    recipients: Sequence[str]
    content: bytes
    body_8bit: bool = False
    ret: str = ""
    envid: str = ""
    notify: Mapping[str, str] = field(default_factory=dict)
    orcpt: Mapping[str, str] = field(default_factory=dict)
    smtputf8: bool = False


# Events returned by Client.next_event()


@dataclass(frozen=True)
class Send:
    """Write ``data``; ``stage`` picks the write timeout."""

    data: bytes
    stage: Stage


@dataclass(frozen=True)
class NeedData:
    """Read from the server and call receive_data(); ``stage`` picks the read timeout."""

    stage: Stage


@dataclass(frozen=True)
class Ready:
    """Greeting and EHLO/HELO done: start a transaction (or quit)."""

    esmtp: bool
    extensions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionFailed:
    """The session ended before it was ready (greeting, EHLO/HELO, AUTH, lost connection,
    timeout): nothing was delivered, another server may be tried. ``permanent``: the
    recipients bounce rather than wait (a 5xx AUTH reply with smtp_sasl_auth_soft_bounce = no);
    else they are deferred whatever the code, as Postfix."""

    dsn: str
    text: str
    reply: Reply | None = None
    permanent: bool = False


@dataclass(frozen=True)
class ReuseFailed:
    """A transaction on a reused session ended before the server answered MAIL FROM: RSET was
    refused, or the connection was lost, timed out or got 421. Nothing was delivered and the
    session is over; the envelope goes on a new connection (not a failed delivery attempt)."""

    text: str


@dataclass(frozen=True)
class TransactionDone:
    """The transaction ended: one result per recipient, in envelope order. ``dsn_passed``: MAIL
    FROM went to a server that offered DSN, with the envelope's DSN parameters, so the notices
    are the next hop's duty now (RFC 3461 §5.2.1: no "relayed" success notice from here)."""

    results: tuple[RecipientResult, ...]
    dsn_passed: bool = False


@dataclass(frozen=True)
class StartTls:
    """The server said 220 to STARTTLS (RFC 3207): run the TLS handshake on the connection,
    then call ``tls_started()``; a failed handshake ends the connection (close it)."""


@dataclass(frozen=True)
class Closed:
    """The connection is finished; close the socket."""


Event = (Send | NeedData | Ready | SessionFailed | ReuseFailed | TransactionDone | StartTls
         | Closed)


class Phase(Enum):
    SESSION = "session"  # greeting, EHLO/HELO
    READY = "ready"  # idle between transactions
    TRANSACTION = "transaction"  # RSET?, MAIL, RCPT…, DATA, body, "."
    QUITTING = "quitting"
    CLOSED = "closed"


def _check_path(value: str) -> str:
    if any(c in value for c in "\r\n\0<>"):
        raise LocalProtocolError(f"unsafe address {value!r}")
    return value


def _check_param(name: str, value: str) -> str:
    """An ESMTP parameter value (RFC 5321 §4.1.2 esmtp-value, which xtext fits in): printable
    US-ASCII without space or "=". Anything else would corrupt the command line."""
    if not all("!" <= c <= "~" and c != "=" for c in value):
        raise LocalProtocolError(f"unsafe {name} value {value!r}")
    return value


class Client:
    """One SMTP client connection. ``peer`` ("host[ip]") appears in texts, ``relay``
    ("host[ip]:port") in the results. ``pipelining=False`` never pipelines (RFC 2920).
    ``discard_ehlo_keywords`` (Postfix's smtp_discard_ehlo_keywords, lower or upper case) are
    EHLO keywords to act as if the server had not offered them, e.g. "chunking" for DATA
    instead of BDAT. ``chunk_size``: the largest BDAT chunk. ``mime_downgrade``: 8-bit MIME
    parts go as quoted-printable to a server without 8BITMIME (Postfix's default; False is
    disable_mime_output_conversion = yes: the 8-bit content goes as it is).
    ``lmtp=True`` speaks LMTP (RFC 2033): LHLO instead of EHLO (no HELO fallback), and after
    the final "." (or BDAT LAST, when the server offers CHUNKING) one reply per accepted
    recipient, in RCPT order.
    ``starttls``: "none" never sends STARTTLS, "may" sends it when offered and goes on in
    plaintext when it is refused, "require" ends the session when it is not offered or refused
    (engine.tls.client decides which, per destination). ``tls_active``: the connection is
    already TLS (wrapper mode), so no STARTTLS.
    ``sasl``: authenticate (RFC 4954) with these credentials after EHLO (and STARTTLS's new
    EHLO), before the first MAIL, when the server offers AUTH, as Postfix's
    smtp_sasl_auth_enable: a server without AUTH gets none, one whose mechanisms the
    smtp_sasl_mechanism_filter removes gets none either (``sasl_warning`` says so), one that
    offers only mechanisms the security options forbid on this session (PLAIN and LOGIN in
    plaintext, by default) ends the session (4.7.0), and a refused AUTH ends it with the
    server's reply ("SASL authentication failed; server … said: …"), the 5xx made 4xx unless
    ``sasl_soft_bounce`` is False."""

    def __init__(
        self,
        helo_name: str,
        *,
        peer: str = "server",
        relay: str = "none",
        pipelining: bool = True,
        max_reply_size: int = 65536,
        discard_ehlo_keywords: Sequence[str] = (),
        chunk_size: int = 1 << 20,
        mime_downgrade: bool = True,
        lmtp: bool = False,
        starttls: str = "none",
        tls_active: bool = False,
        sasl: SaslLogin | None = None,
        sasl_soft_bounce: bool = True,
    ) -> None:
        if any(c in helo_name for c in "\r\n\0 ") or not helo_name:
            raise LocalProtocolError(f"bad HELO name {helo_name!r}")
        self.helo_name = helo_name
        self.peer = peer
        self.relay = relay
        self.use_pipelining = pipelining
        self.discard_ehlo_keywords = frozenset(k.upper() for k in discard_ehlo_keywords)
        self.chunk_size = chunk_size
        self.mime_downgrade = mime_downgrade
        self.lmtp = lmtp
        if starttls not in ("none", "may", "require"):
            raise LocalProtocolError(f"bad starttls mode {starttls!r}")
        self.starttls = starttls
        self.tls_active = tls_active
        self.sasl = sasl
        self.sasl_soft_bounce = sasl_soft_bounce
        self.sasl_mechanism: str | None = None  # of the AUTH sent (None again if refused)
        self.sasl_warning: str | None = None  # for the adapter's log (no usable mechanism)
        self._sasl_responses: list[bytes] = []  # answers to the server's 334 challenges
        self._sasl_cancelled = False
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self.transactions = 0  # started on this connection (Postfix's conn_use)
        self.phase = Phase.SESSION
        self._replies = ReplyBuffer(max_reply_size)
        self._eof = False
        self._events: deque[Event] = deque()
        self._expect: deque[Stage] = deque([Stage.GREETING])  # replies owed, in order
        self._stage = Stage.GREETING  # of the last Send/NeedData, for timeout texts
        self._new_transaction(None)

    # ---- the adapter's side ----

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" means the connection was closed (or broke)."""
        if data:
            self._replies.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event:
        """What the adapter must do next."""
        while True:
            if self._events:
                event = self._events.popleft()
                if isinstance(event, Send | NeedData):
                    self._stage = event.stage
                    if event.stage in _CONTENT and isinstance(event, Send):
                        self._content_went = True
                return event
            if self.phase is Phase.CLOSED:
                return Closed()
            if not self._expect:
                raise LocalProtocolError(
                    "idle: call start_transaction(), quit() or (after StartTls) tls_started()")
            try:
                reply = self._replies.read_reply()
            except RemoteProtocolError as exc:
                self._connection_failed(f"{self.peer} sent a malformed reply ({exc})")
                continue
            if reply is None:
                if self._eof:
                    self._connection_failed(
                        f"lost connection with {self.peer} while {self._doing()}"
                    )
                    continue
                self._stage = self._expect[0]
                return NeedData(self._expect[0])
            stage = self._expect.popleft()
            if reply.code == 421 and stage is not Stage.QUIT:
                self._server_closing(reply, stage)
            else:
                self._ON_REPLY[stage](self, reply, stage)

    def timed_out(self) -> None:
        """The adapter's timer for the current stage ran out: the connection is dead."""
        if self.phase is not Phase.CLOSED:
            self._connection_failed(
                f"conversation with {self.peer} timed out while {self._doing()}"
            )

    @property
    def pending_input(self) -> bool:
        """Whether the server sent bytes beyond the last reply read. After StartTls this must be
        False before the handshake: bytes behind STARTTLS's 220 came in plaintext, and the
        adapter fails the session rather than take them for TLS-protected replies."""
        return self._replies.pending

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake after StartTls: forget what the server said
        in plaintext (its extensions: RFC 3207 §4.2) and say EHLO again. Bytes behind the 220
        (the CVE-2011-0411 class) are dropped here too, though the adapter already refused the
        session when ``pending_input`` said there were any."""
        self.tls_active = True
        self.esmtp = False
        self.extensions = {}
        self._replies = ReplyBuffer(self._replies._max)
        hello = "LHLO" if self.lmtp else "EHLO"
        self._send(f"{hello} {self.helo_name}\r\n".encode(), Stage.EHLO)

    def start_transaction(self, envelope: Envelope) -> None:
        """Send one message (after Ready or TransactionDone)."""
        if self.phase is not Phase.READY:
            raise LocalProtocolError(f"cannot start a transaction in phase {self.phase.value}")
        if not envelope.recipients:
            raise LocalProtocolError("no recipients")
        _check_path(envelope.sender)
        for rcpt in envelope.recipients:
            _check_path(rcpt)
        _check_param("RET", envelope.ret)
        _check_param("ENVID", envelope.envid)
        for rcpt in envelope.recipients:
            _check_param("NOTIFY", envelope.notify.get(rcpt, ""))
            _check_param("ORCPT", envelope.orcpt.get(rcpt, ""))
        if (
            self.mime_downgrade
            and "8BITMIME" not in self.extensions
            and not envelope.content.isascii()
        ):
            envelope = replace(envelope, content=downgrade(envelope.content))
        self.phase = Phase.TRANSACTION
        self._new_transaction(envelope)
        self.transactions += 1
        limit = self.size_limit
        if limit and len(envelope.content) > limit:  # RFC 1870 §6
            self._bounce_unsent(
                "5.3.4",
                f"message size {len(envelope.content)} exceeds size limit {limit}"
                f" of server {self.peer}",
            )
        elif "SMTPUTF8" not in self.extensions and needs_smtputf8(envelope):  # RFC 6531 §3.2
            self._bounce_unsent(
                "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.peer}"
            )
        elif self.transactions > 1:  # clean up after the last one, and see the session lives
            self._send(b"RSET\r\n", Stage.RSET)
        else:
            self._send_mail()

    def _bounce_unsent(self, dsn: str, text: str) -> None:
        """Every recipient bounces before MAIL FROM: the server cannot take this message."""
        self._results = [
            RecipientResult(r, "bounced", dsn, text, self.relay) for r in self._env.recipients
        ]
        self._finish_transaction()

    def quit(self) -> None:
        """End the session politely (no-op once closing or closed)."""
        if self.phase in (Phase.READY, Phase.SESSION):
            self.phase = Phase.QUITTING
            self._send(b"QUIT\r\n", Stage.QUIT)

    @property
    def size_limit(self) -> int:
        """The server's SIZE limit (RFC 1870), 0 when none."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    # ---- reply handlers: the state table ----

    def _on_greeting(self, reply: Reply, stage: Stage) -> None:
        if reply.ok:
            hello = "LHLO" if self.lmtp else "EHLO"
            self._send(f"{hello} {self.helo_name}\r\n".encode(), Stage.EHLO)
        else:
            self._session_failed(reply, f"host {self.peer} refused to talk to me: {reply.flat}")

    def _on_ehlo(self, reply: Reply, stage: Stage) -> None:
        if reply.ok:
            self.esmtp = True
            self.extensions = {
                keyword: params
                for keyword, params in _extensions(reply).items()
                if keyword not in self.discard_ehlo_keywords
            }
            if self.starttls != "none" and not self.tls_active:
                if "STARTTLS" in self.extensions:
                    self._send(b"STARTTLS\r\n", Stage.STARTTLS)
                    return
                if self.starttls == "require":
                    self._tls_missing()
                    return
            self._login_or_ready()
        elif reply.code >= 500 and not self.lmtp:  # RFC 5321 §3.2: fall back to HELO
            self._send(f"HELO {self.helo_name}\r\n".encode(), Stage.HELO)
        else:
            self._session_failed(reply, self._said(reply, stage))

    def _on_helo(self, reply: Reply, stage: Stage) -> None:
        if reply.ok and self.starttls == "require" and not self.tls_active:
            self._tls_missing()  # HELO offers no STARTTLS
        elif reply.ok:
            self._ready()
        else:
            self._session_failed(reply, self._said(reply, stage))

    def _on_starttls(self, reply: Reply, stage: Stage) -> None:
        if reply.code == 220:
            self._events.append(StartTls())
        elif self.starttls == "require":
            self._session_failed(reply, f"TLS is required, but host {self.peer} refused to"
                                 f" start TLS: {reply.flat}")
        else:  # opportunistic: the session goes on in plaintext, as Postfix's "may"
            self._login_or_ready()

    def _login_or_ready(self) -> None:
        """After the (last) EHLO: AUTH first when there are credentials and the server offers
        a mechanism for them (Postfix's smtp_sasl_helo_login), else ready."""
        mechanisms = offered(self.extensions) if self.sasl is not None else []
        if not mechanisms:  # no credentials, or no AUTH offered: go on without it, as Postfix
            self._ready()
            return
        usable = filtered(self.sasl, mechanisms)
        if not usable:
            self.sasl_warning = (f"{self.peer} offered no supported AUTH mechanisms:"
                                 f" '{' '.join(mechanisms)}'")
            self._ready()
            return
        mechanism = choose(self.sasl, usable, self.tls_active)
        if mechanism is None:
            self._events.append(SessionFailed(
                "4.7.0", f"SASL authentication failed; cannot authenticate to server"
                f" {self.peer}: no mechanism available"))
            self.quit()
            return
        command, self._sasl_responses = exchange(mechanism, self.sasl)
        self.sasl_mechanism = mechanism
        self._send(command, Stage.AUTH)

    def _on_auth(self, reply: Reply, stage: Stage) -> None:
        if reply.code == 334:  # a challenge: the next response, or cancel (RFC 4954 §4)
            if self._sasl_responses:
                self._send(self._sasl_responses.pop(0), Stage.AUTH)
            elif not self._sasl_cancelled:
                self._sasl_cancelled = True
                self._send(b"*\r\n", Stage.AUTH)
            else:
                self._sasl_responses = []
                self._events.append(SessionFailed(
                    "4.3.0", f"SASL authentication failed; authentication protocol loop with"
                    f" server {self.peer}"))
                self.quit()
            return
        self._sasl_responses = []
        if reply.ok:  # 235
            self._ready()
            return
        self.sasl_mechanism = None
        dsn = reply.dsn
        permanent = dsn[0] == "5" and not self.sasl_soft_bounce
        if dsn[0] == "5" and self.sasl_soft_bounce:
            dsn = "4" + dsn[1:]
        self._events.append(SessionFailed(
            dsn, f"SASL authentication failed; server {self.peer} said: {reply.flat}", reply,
            permanent))
        self.quit()

    def _tls_missing(self) -> None:
        self._events.append(SessionFailed(
            "4.7.4", f"TLS is required, but was not offered by host {self.peer}"))
        self.quit()

    def _on_rset(self, reply: Reply, stage: Stage) -> None:
        if reply.ok:
            self._send_mail()
            return
        # Postfix's SMTP_FEATURE_RSET_REJECTED: a session that refuses RSET is not reused.
        self._events.append(ReuseFailed(self._said(reply, stage)))
        self.phase = Phase.READY
        self._new_transaction(None)
        self.quit()

    def _on_mail(self, reply: Reply, stage: Stage) -> None:
        self._mail_replied = True
        if reply.ok:
            self._mail_ok = True
            if not self._pipelined:
                self._send_rcpt()
            return
        for index in range(len(self._env.recipients)):
            self._fail(index, reply, stage)
        if not self._pipelined:  # else the RCPT and DATA replies are still owed
            self._finish_transaction()

    def _on_rcpt(self, reply: Reply, stage: Stage) -> None:
        index = self._rcpt_replied
        self._rcpt_replied += 1
        if self._mail_ok:
            if reply.ok:  # 250, 251 (RFC 5321 §3.3)
                self._accepted.append(index)
            else:
                self._fail(index, reply, stage)
        if self._pipelined and not self._chunking:
            return
        if self._rcpt_sent < len(self._env.recipients):
            self._send_rcpt()
        elif self._rcpt_replied < self._rcpt_sent:  # pipelined for BDAT: more replies owed
            return
        elif not self._accepted:
            self._finish_transaction()
        elif self._chunking:
            self._send_chunks()
        else:
            self._send(b"DATA\r\n", Stage.DATA)

    def _on_data(self, reply: Reply, stage: Stage) -> None:
        if reply.code == 354:
            if self._mail_ok and self._accepted:
                self._send(dot_stuff(self._env.content) + b".\r\n", Stage.BODY, Stage.DOT)
                if self.lmtp:  # RFC 2033 §4.2: one reply per accepted recipient
                    self._expect.extend([Stage.DOT] * (len(self._accepted) - 1))
            else:  # RFC 2920 §3.1: 354 with no valid recipient: send an empty message, ignore it
                self._discard_dot = True
                self._send(b".\r\n", Stage.DOT)
            return
        for index in self._accepted:
            self._fail(index, reply, stage)
        self._finish_transaction()

    def _on_dot(self, reply: Reply, stage: Stage) -> None:
        if self.lmtp and not self._discard_dot:
            if not self._lmtp_reply(reply, stage):
                return
        elif not self._discard_dot:
            for index in self._accepted:
                if reply.ok:
                    self._results[index] = RecipientResult(
                        self._env.recipients[index], "sent", reply.dsn, reply.flat, self.relay
                    )
                else:
                    self._fail(index, reply, stage)
        self._finish_transaction()

    def _lmtp_reply(self, reply: Reply, stage: Stage) -> bool:
        """One of LMTP's replies after the end of the content (RFC 2033 §4.2, §4.3): the
        result of the next accepted recipient, in RCPT order. True once every one has its."""
        index = self._accepted[self._dot_replied]
        self._dot_replied += 1
        if reply.ok:
            self._results[index] = RecipientResult(
                self._env.recipients[index], "sent", reply.dsn, reply.flat, self.relay
            )
        else:
            self._fail(index, reply, stage)
        return self._dot_replied == len(self._accepted)

    def _on_bdat(self, reply: Reply, stage: Stage) -> None:
        """A chunk's reply (RFC 3030 §2): the last one is the message's, like the reply to
        "."; a failed earlier one fails the message (later chunks' replies are still read).
        LMTP (RFC 2033 §4.3): BDAT LAST gets one reply per accepted recipient; the chunks go
        one a reply there, so a failed earlier chunk means no BDAT LAST was sent."""
        if self.lmtp and not self._chunks:  # every earlier chunk got its 250: BDAT LAST's
            if self._lmtp_reply(reply, stage):
                self._finish_transaction()
            return
        self._chunks_replied += 1
        if self._bdat_failure is None and not reply.ok:
            self._bdat_failure = reply
        if self._chunks_replied < self._chunks_sent:
            if self._chunks:  # not pipelined: the next chunk, or none after a failure
                if self._bdat_failure is None:
                    self._send_chunk()
                    return
                self._chunks.clear()
                self._chunks_sent = self._chunks_replied
            else:
                return
        final = self._bdat_failure or reply
        for index in self._accepted:
            if final.ok:
                self._results[index] = RecipientResult(
                    self._env.recipients[index], "sent", final.dsn, final.flat, self.relay
                )
            else:
                self._fail(index, final, stage)
        self._finish_transaction()

    def _on_quit(self, reply: Reply, stage: Stage) -> None:
        self._close()

    _ON_REPLY: dict[Stage, Callable[[Client, Reply, Stage], None]] = {
        Stage.GREETING: _on_greeting,
        Stage.EHLO: _on_ehlo,
        Stage.HELO: _on_helo,
        Stage.RSET: _on_rset,
        Stage.MAIL: _on_mail,
        Stage.RCPT: _on_rcpt,
        Stage.DATA: _on_data,
        Stage.DOT: _on_dot,
        Stage.BDAT: _on_bdat,
        Stage.QUIT: _on_quit,
        Stage.STARTTLS: _on_starttls,
        Stage.AUTH: _on_auth,
    }

    # ---- helpers ----

    def _send(self, data: bytes, stage: Stage, expect: Stage | None = None) -> None:
        """Queue a write and the reply it owes (``expect`` when it differs from ``stage``)."""
        self._events.append(Send(data, stage))
        self._expect.append(expect or stage)

    def _new_transaction(self, envelope: Envelope | None) -> None:
        self._env = envelope  # type: ignore[assignment]
        count = len(envelope.recipients) if envelope else 0
        self._results: list[RecipientResult | None] = [None] * count
        self._accepted: list[int] = []
        self._mail_replied = False
        self._content_went = False  # a body, "." or BDAT write was handed to the adapter
        self._mail_ok = False
        self._pipelined = False
        self._rcpt_sent = 0
        self._rcpt_replied = 0
        self._discard_dot = False
        self._dot_replied = 0  # LMTP: replies to "." so far
        self._dsn = False  # DSN parameters go with this transaction (the server offers DSN)
        self._chunking = False  # the content goes as BDAT chunks (the server offers CHUNKING)
        self._chunks_sent = 0
        self._chunks_replied = 0
        self._bdat_failure: Reply | None = None
        self._chunks: deque[bytes] = deque()  # not yet sent (no PIPELINING: one a reply)

    def _send_mail(self) -> None:
        env = self._env
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={len(env.content)}"
        if env.body_8bit and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if env.smtputf8 and "SMTPUTF8" in self.extensions:
            params += " SMTPUTF8"
        # RFC 3461 §5.2.1: pass the DSN request on, but only to a server that offers DSN
        self._dsn = "DSN" in self.extensions
        if self._dsn and env.ret:
            params += f" RET={env.ret}"
        if self._dsn and env.envid:
            params += f" ENVID={env.envid}"
        mail = f"MAIL FROM:<{env.sender}>{params}\r\n".encode()
        self._chunking = "CHUNKING" in self.extensions
        self._pipelined = self.use_pipelining and "PIPELINING" in self.extensions
        if not self._pipelined:
            self._send(mail, Stage.MAIL)
            return
        # RFC 2920 §3.1: MAIL, every RCPT and DATA in one write; the replies come in order.
        # With CHUNKING the content waits for the RCPT replies: no chunk goes to a
        # transaction without recipients (RFC 3030 has no 354 to stop it).
        rcpts = b"".join(self._rcpt_command(r) for r in env.recipients)
        data = b"" if self._chunking else b"DATA\r\n"
        self._events.append(Send(mail + rcpts + data, Stage.MAIL))
        self._expect.append(Stage.MAIL)
        self._expect.extend([Stage.RCPT] * len(env.recipients))
        self._rcpt_sent = len(env.recipients)
        if not self._chunking:  # else the last RCPT reply sends the chunks (or ends)
            self._expect.append(Stage.DATA)

    def _send_chunks(self) -> None:
        """The content as BDAT chunks: all in one go when the server pipelines (RFC 3030 §4.2),
        else one chunk a reply (the reply to a chunk sends the next). LMTP always goes one
        chunk a reply: how many replies BDAT LAST gets after a failed chunk is not said by
        RFC 2033, so no BDAT LAST follows a failed chunk there."""
        self._chunks = deque(bdat_chunks(self._env.content, self.chunk_size))
        self._chunks_sent = len(self._chunks)
        if self.use_pipelining and "PIPELINING" in self.extensions and not self.lmtp:
            # one write each, back to back (no copy of the whole content joined)
            self._events.extend(Send(chunk, Stage.BODY) for chunk in self._chunks)
            self._expect.extend([Stage.BDAT] * self._chunks_sent)
            self._chunks.clear()
        else:
            self._send_chunk()

    def _send_chunk(self) -> None:
        """The next chunk, alone. LMTP: BDAT LAST owes one reply per accepted recipient."""
        self._send(self._chunks.popleft(), Stage.BODY, Stage.BDAT)
        if self.lmtp and not self._chunks:
            self._expect.extend([Stage.BDAT] * (len(self._accepted) - 1))

    def _send_rcpt(self) -> None:
        rcpt = self._env.recipients[self._rcpt_sent]
        self._rcpt_sent += 1
        self._send(self._rcpt_command(rcpt), Stage.RCPT)

    def _rcpt_command(self, rcpt: str) -> bytes:
        params = ""
        if self._dsn:
            if notify := self._env.notify.get(rcpt):
                params += f" NOTIFY={notify}"
            if orcpt := self._env.orcpt.get(rcpt):
                params += f" ORCPT={orcpt}"
        return f"RCPT TO:<{rcpt}>{params}\r\n".encode()

    def _doing(self) -> str:
        """Postfix's "… while <doing>" for the current stage (LMTP's handshake is LHLO)."""
        if self.lmtp and self._stage is Stage.EHLO:
            return "performing the LHLO handshake"
        return DOING[self._stage]

    def _said(self, reply: Reply, stage: Stage) -> str:
        command = "LHLO" if self.lmtp and stage is Stage.EHLO else COMMAND[stage]
        return f"host {self.peer} said: {reply.flat} (in reply to {command} command)"

    def _fail(self, index: int, reply: Reply, stage: Stage) -> None:
        """Recipient ``index`` gets a 4xx (deferred) or 5xx (bounced) reply."""
        status = "bounced" if reply.code >= 500 else "deferred"
        self._results[index] = RecipientResult(
            self._env.recipients[index], status, reply.dsn, self._said(reply, stage), self.relay
        )

    def _ready(self) -> None:
        self.phase = Phase.READY
        self._events.append(Ready(self.esmtp, dict(self.extensions)))

    def _finish_transaction(self) -> None:
        results = tuple(
            result
            or RecipientResult(rcpt, "deferred", "4.0.0", f"no reply from {self.peer}", self.relay)
            for rcpt, result in zip(self._env.recipients, self._results, strict=True)
        )
        self._events.append(TransactionDone(results, self._dsn))
        self.phase = Phase.READY
        self._new_transaction(None)

    def _session_failed(self, reply: Reply, text: str) -> None:
        self._events.append(SessionFailed(reply.dsn, text, reply))
        self.quit()

    def _server_closing(self, reply: Reply, stage: Stage) -> None:
        """421 (RFC 5321 §3.8): the server is closing the connection; no QUIT."""
        if self.phase is Phase.SESSION:
            text = (
                self._said(reply, stage)
                if stage in COMMAND
                else (f"host {self.peer} refused to talk to me: {reply.flat}")
            )
            self._events.append(SessionFailed(reply.dsn, text, reply))
        elif self._reuse_failed():
            self._events.append(ReuseFailed(self._said(reply, stage)))
        elif self.phase is Phase.TRANSACTION:
            for index, result in enumerate(self._results):
                if result is None:
                    self._fail(index, reply, stage)
            self._finish_transaction()
        self._close()

    def _connection_failed(self, text: str) -> None:
        """Lost connection, timeout or garbage: every open outcome is deferred (dsn 4.4.2)."""
        if self.phase is Phase.SESSION:
            self._events.append(SessionFailed("4.4.2", text))
        elif self._reuse_failed():
            self._events.append(ReuseFailed(text))
        elif self.phase is Phase.TRANSACTION:
            unsent = not self._content_went  # nothing of the message was handed out to go
            for index, result in enumerate(self._results):
                if result is None:
                    self._results[index] = RecipientResult(
                        self._env.recipients[index], "deferred", "4.4.2", text, self.relay,
                        next_mx=unsent,
                    )
            self._finish_transaction()
        self._close()

    def _reuse_failed(self) -> bool:
        """Whether the session ends inside a reused session's transaction before the server
        answered MAIL FROM (nothing of it was delivered)."""
        return self.phase is Phase.TRANSACTION and self.transactions > 1 and not self._mail_replied

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._expect.clear()
        self._events = deque(e for e in self._events if not isinstance(e, Send | NeedData))


# Writes that carry the message: once one went out, the end of data may have reached the
# server, so a session lost after it must not hand the recipients to another MX host.
_CONTENT = frozenset({Stage.BODY, Stage.DOT, Stage.BDAT})


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters; the first line is the server's name."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            out[keyword.upper()] = params.strip()
    return out
