"""The SMTP server dialogue (RFC 5321) as a sans-I/O state machine.

``receive_data(bytes)`` → ``next_event()`` → ``accept()`` / ``reject(reply)`` → ``data_to_send()``.
No sockets, no awaits, no clock. Trusts nothing from the client; decisions that need the world
(relay control, spool commit) are returned as request events and the session waits, input
buffered, until the application answers: that is what keeps pipelined replies in order.

Message content comes as DATA (dot-stuffed, RFC 5321 §4.5.2) or as BDAT chunks (a byte count,
RFC 3030); either way the application sees the same events: Data (the request to begin a
message), MessageChunk notices, and the MessageEnd request.
"""

import re
from dataclasses import dataclass, field
from enum import Enum

from engine import speedups
from engine.auth import sasl
from engine.smtp import replies
from engine.smtp.grammar import XTEXT, GrammarError, dsn_envid, dsn_notify, dsn_orcpt, dsn_ret
from engine.smtp.reader import LineTooLong
from engine.smtp.replies import Reply
from engine.smtp.xclient import XCLIENT_ATTRIBUTES, XFORWARD_ATTRIBUTES, parse_attributes

_grammar = speedups.load("grammar")  # the command-parsing hot path: compiled when built
split_command = _grammar.split_command
parse_mail_from = _grammar.parse_mail_from
parse_rcpt_to = _grammar.parse_rcpt_to

# ---------------------------------------------------------------------------------------------
# Events. Requests (Helo, MailFrom, RcptTo, Data, MessageEnd, StartTls, Auth, Xclient, Xforward)
# must be answered with accept() or reject(); MessageChunk, Reset, AuthRefused and Closed are
# notices.


@dataclass(frozen=True, slots=True)
class Helo:
    name: str
    extended: bool  # EHLO rather than HELO


@dataclass(frozen=True, slots=True)
class MailFrom:
    sender: str  # "" for the null sender <>
    # SIZE, BODY as given; RFC 3461 RET upper-cased ("FULL" / "HDRS"), ENVID as given (xtext)
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RcptTo:
    recipient: str
    # RFC 3461 NOTIFY canonical ("NEVER" or e.g. "SUCCESS,FAILURE"), ORCPT as given ("rfc822;…")
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    """The client wants to send the message: DATA, or the first BDAT chunk of a transaction
    (``bdat``: accepting it sends no 354, the chunk's bytes follow by count)."""

    bdat: bool = False


@dataclass(frozen=True, slots=True)
class MessageChunk:
    data: bytes  # DATA: unstuffed payload, CRLF line ends kept; BDAT: the bytes as sent


@dataclass(frozen=True, slots=True)
class MessageEnd:
    chunked_size: int | None = None  # BDAT: the bytes of every chunk (None after DATA)


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS (RFC 3207): accept() sends 220 and forgets the plaintext pipelined behind it;
    the adapter then runs the handshake and calls ServerSession.tls_started()."""


@dataclass(frozen=True, slots=True)
class Reset:
    """The open transaction (if any) was abandoned: RSET, HELO/EHLO, or a rejected message."""


@dataclass(frozen=True, slots=True)
class Auth:
    """RFC 4954: a SASL exchange gave these credentials; accept() if the password is right
    (235), reject() with 535 if not. The password stays out of repr (and so out of logs)."""

    mechanism: str  # PLAIN, LOGIN
    username: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthRefused:
    """A SASL exchange ended before any password was checked (unknown mechanism, bad base64,
    aborted …); its reply is already queued. ``reason`` is ours, never client data."""

    mechanism: str
    reason: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Xclient:
    """An authorized client replaces the session's client identity (Postfix's XCLIENT_README).
    Accepting it starts the session over with a new 220 greeting."""

    attributes: dict[str, str | None]  # NAME, ADDR …; None: [UNAVAILABLE] / [TEMPUNAVAIL]


@dataclass(frozen=True, slots=True)
class Xforward:
    """An authorized client forwards the up-stream client's attributes for the next
    transaction's logs and Received: header (Postfix's XFORWARD_README)."""

    attributes: dict[str, str | None]  # NAME, ADDR, IDENT …; None: [UNAVAILABLE]


@dataclass(frozen=True, slots=True)
class Closed:
    during: str  # the last command, for Postfix's "lost connection after DATA"
    quit: bool
    hangup: bool = False  # the dialogue itself ended it (521 after a malformed BDAT)


@dataclass(frozen=True, slots=True)
class Violation:
    """Notice: the client broke a rule the dialogue enforces; the reply is already queued (and
    the session closed when ``closing``). For Postfix's log lines: "too many errors after RCPT",
    "improper command pipelining after EHLO from …: MAIL FROM:<…>\\r\\n"."""

    what: str  # "too many errors", "improper command pipelining", "bare <LF> received", …
    after: str  # the command it came with (or before: CONNECT)
    detail: str = ""  # the offending input, escaped as Postfix does
    closing: bool = False


Event = (Helo | MailFrom | RcptTo | Data | MessageChunk | MessageEnd | StartTls | Reset | Auth
         | AuthRefused | Closed | Violation | Xclient | Xforward)

# ---------------------------------------------------------------------------------------------
# States and the sequencing table: everything that decides which command may come when.


class State(Enum):
    IDLE = "idle"  # no transaction (greeted or not: HELO is optional, as in Postfix)
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # receiving message content
    BDAT = "bdat"  # between BDAT chunks (RFC 3030), or after a failed one until RSET/BDAT LAST
    CLOSED = "closed"


#: (state, verb) pairs refused for their place in the dialogue, with Postfix's replies.
SEQUENCE_ERRORS: dict[tuple[State, str], Reply] = {
    (State.IDLE, "RCPT"): replies.NEED_MAIL,
    (State.IDLE, "DATA"): replies.NEED_RCPT,
    (State.MAIL, "MAIL"): replies.NESTED_MAIL,
    (State.RCPT, "MAIL"): replies.NESTED_MAIL,
    (State.MAIL, "DATA"): replies.NO_VALID_RECIPIENTS,
    (State.BDAT, "MAIL"): replies.MAIL_AFTER_BDAT,
    (State.BDAT, "RCPT"): replies.RCPT_AFTER_BDAT,
    (State.BDAT, "DATA"): replies.DATA_AFTER_BDAT,
}

#: BDAT outside a transaction with recipients: the chunk is still read (and dropped), so the
#: stream stays in step, then refused as DATA would be (Postfix's replies).
BDAT_SEQUENCE_ERRORS: dict[State, Reply] = {
    State.IDLE: replies.NEED_RCPT,
    State.MAIL: replies.NO_VALID_RECIPIENTS,
}

#: Commands after which input must not already be waiting (Postfix's SMTPD_CMD_FLAG_LAST: the
#: RFC 2920 §3.1 "last in a group" commands it implements). STARTTLS is not one: the plaintext
#: pipelined behind it is discarded instead (CVE-2011-0411); nor QUIT, after which nothing runs.
PIPELINE_LAST = frozenset({"EHLO", "HELO", "DATA", "NOOP", "VRFY"})
#: Commands smtpd_tls_security_level = encrypt allows before STARTTLS (Postfix's PRE_TLS flag);
#: every other one gets 530. BDAT goes on to its own refusal, which still reads the chunk.
PRE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT", "XCLIENT", "XFORWARD",
                     "BDAT"})

#: RFC 3461 parameters: keyword → (value check returning the value to keep or None, the reply
#: for a malformed or repeated one).
MAIL_DSN_PARAMETERS = {
    "RET": (dsn_ret, replies.BAD_RET),
    "ENVID": (dsn_envid, replies.BAD_ENVID),
}
RCPT_DSN_PARAMETERS = {
    "NOTIFY": (dsn_notify, replies.BAD_NOTIFY),
    "ORCPT": (dsn_orcpt, replies.BAD_ORCPT),
}

#: The state a request moves to when the application accepts it, and the default reply.
ON_ACCEPT: dict[type, tuple[State | None, Reply | None]] = {
    Helo: (State.IDLE, None),  # reply built from the extensions
    MailFrom: (State.MAIL, replies.SENDER_OK),
    RcptTo: (State.RCPT, replies.RECIPIENT_OK),
    Data: (State.DATA, replies.START_DATA),
    MessageEnd: (State.IDLE, replies.OK),
    StartTls: (State.IDLE, replies.READY_TO_START_TLS),
    Auth: (State.IDLE, replies.AUTH_OK),  # AUTH is refused inside a transaction
    Xclient: (State.IDLE, None),  # reply: the greeting again
    Xforward: (None, replies.OK),  # None: the state does not change
}

#: The state a request falls back to when refused (None: stay where it was).
ON_REJECT: dict[type, State | None] = {
    Helo: None,
    MailFrom: None,
    RcptTo: None,
    Data: None,
    MessageEnd: State.IDLE,
    StartTls: None,
    Auth: None,
    Xclient: None,
    Xforward: None,
}


@dataclass(frozen=True)
class Settings:
    """What the dialogue needs to know of the configuration."""

    hostname: str
    banner: str
    message_size_limit: int = 10240000
    recipient_limit: int = 1000
    line_length_limit: int = 2048
    starttls: bool = False  # STARTTLS offered on this listener (a certificate, level may/encrypt)
    require_tls: bool = False  # smtpd_tls_security_level = encrypt: no MAIL before STARTTLS
    auth_enabled: bool = False  # smtpd_sasl_auth_enable, and credentials to check exist
    tls_auth_only: bool = True  # smtpd_tls_auth_only: AUTH only once TLS is active
    auth_required: bool = False  # a submission service: MAIL needs AUTH first (530)
    # abuse defences (the adapter passes the configuration's; these defaults keep the core lax)
    hard_error_limit: int = 0  # errors before 421 and disconnect; 0 = none
    # past this many errors, one reply at a time: next_event stops while replies are queued,
    # so the adapter can delay each (smtpd_error_sleep_time); 0 = off
    soft_error_limit: int = 0
    forbid_unauth_pipelining: bool = False
    reject_bare_newline: bool = False  # smtpd_forbid_bare_newline = reject (else normalize)
    bare_newline_reject_code: int = 550


def escape(data: bytes) -> str:
    """Input shown in a log line as Postfix's escape() does: printable ASCII as is, the rest as
    C escapes (\\r, \\n, \\t, \\\\, else \\ooo)."""
    out = []
    for byte in data:
        if byte == 92:
            out.append("\\\\")
        elif 32 <= byte < 127:
            out.append(chr(byte))
        else:
            out.append(_ESCAPES.get(byte) or f"\\{byte:03o}")
    return "".join(out)


_ESCAPES = {13: "\\r", 10: "\\n", 9: "\\t"}


def escape_command(data: bytes, *, sasl_response: bool = False) -> str:
    """Client command text for a log line, escaped, with AUTH credentials redacted: from the
    first AUTH verb on (even after a NUL or a bare CR), only "AUTH MECH" is kept and the rest,
    including any pipelined SASL response lines, becomes "..."; with ``sasl_response`` the text
    is itself a response to a 334 challenge and is never shown. One function for every warning
    that quotes client input, so a password never reaches the maillog."""
    if sasl_response:
        return "..." if data else ""
    found = _AUTH_VERB.search(data)
    if found is None:
        return escape(data)
    mech = data[found.end():].split(None, 1)[:1]
    shown = escape(data[:found.start(1)]) + "AUTH"
    return shown + (" " + escape(mech[0][:20]) + " ..." if mech else "")


_AUTH_VERB = re.compile(rb"(?:^|[^A-Za-z0-9])(auth)(?=[\s\0]|$)", re.IGNORECASE)


@dataclass(slots=True)
class _Chunk:
    """The BDAT chunk being read: its declared size, LAST, the bytes still to come, and the
    reply that answers it once read when it is being discarded."""

    size: int
    last: bool
    left: int
    refusal: Reply | None = None


class ServerSession:
    """One client's SMTP dialogue, from greeting to QUIT or lost connection."""

    def __init__(self, settings: Settings, reader_class: type | None = None) -> None:
        self.settings = settings
        self.state = State.IDLE
        self.helo_name: str | None = None
        self.extended = False  # the client said EHLO
        self.tls_active = False  # set by tls_started() once STARTTLS / SMTPS has its handshake
        self._helo_again = False  # after STARTTLS: MAIL needs a new HELO/EHLO (RFC 3207 §4.2)
        self.authenticated = False  # a successful AUTH (RFC 4954: at most one per session)
        self._sasl: sasl.Exchange | None = None  # an AUTH exchange waiting for a response
        # set by the adapter from the client address (smtpd_authorized_xclient/xforward_hosts)
        self.xclient_allowed = False
        self.xforward_allowed = False
        self.last_command = "CONNECT"
        self.command_counts: dict[str, int] = {}
        self._reader_class = reader_class or speedups.Reader
        self._reader = self._new_reader()
        self._out: list[bytes] = [Reply(220, settings.banner).encode()]
        self._pending: Event | None = None
        self._ready: list[Event] = []  # events produced but not yet returned
        self._recipients = 0
        self._eof = False
        self._closed_reported = False
        # errors since the last delivered message (Postfix's error_count): 4xx/5xx replies to
        # the client's commands, not the ones the application sends on its own (timeouts)
        self.error_count = 0
        self.reject_bare_newline = settings.reject_bare_newline  # off for excluded clients
        self._smtputf8 = False  # the open transaction's MAIL FROM said SMTPUTF8 (RFC 6531)
        self._chunk: _Chunk | None = None  # a BDAT chunk's bytes are being read
        self._bdat_bytes = 0  # bytes of the accepted BDAT chunks of this transaction
        self._bdat_failed = False  # a chunk failed: later ones are dropped until RSET/LAST
        self._hangup = False  # we answered 521 and close

    # -- I/O side ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means the client closed its side."""
        if data:
            self._reader.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def awaiting_answer(self) -> bool:
        return self._pending is not None

    @property
    def pending_input(self) -> int:
        """Bytes received and not yet consumed: a partial request, or pipelined ones."""
        return len(self._reader)

    def replace_greeting(self, reply: Reply) -> None:
        """Answer the connection with ``reply`` instead of the 220 (a limit refused the
        client); the session ends."""
        self._out[:] = [reply.encode()]
        self.state = State.CLOSED

    def synchronization_error(self, after: str = "CONNECT") -> None:
        """The client spoke before the greeting (the adapter found input waiting when it was
        about to greet): Postfix's 554 instead of the 220, and the session ends."""
        self._out.clear()
        self._violation("improper command pipelining", after, closing=True,
                        detail=escape_command(self._reader.peek(100)))
        self._out.append(replies.SYNCHRONIZATION_ERROR.encode())
        self.state = State.CLOSED

    def send_reply(self, reply: Reply) -> None:
        """Queue a reply the application originates (timeouts, shutdown)."""
        self._out.append(reply.encode())
        if reply.code == 421:
            self.state = State.CLOSED

    # -- events -----------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event, or None when more input (or an answer to a request) is needed."""
        while True:
            if self._ready:
                event = self._ready.pop(0)
                if type(event) in ON_ACCEPT:
                    self._pending = event
                return event
            if self._pending is not None:
                return None
            if self.state is State.CLOSED:
                return self._closed_event(quit=self.last_command == "QUIT")
            if self._chunk is not None:
                if self._read_chunk():
                    continue
                return self._closed_event(quit=False) if self._eof else None
            if self.state is State.DATA:
                chunk, ended = self._reader.read_data()
                if chunk:
                    self._ready.append(MessageChunk(chunk))
                if ended:
                    if self.reject_bare_newline and self._reader.bare_lf:
                        self._refuse_bare_newline("DATA", message=True)
                    else:
                        self._ready.append(MessageEnd())
                if self._ready:
                    continue
                return self._closed_event(quit=False) if self._eof else None
            soft = self.settings.soft_error_limit
            if soft and self.error_count >= soft and self._out:
                return None  # tarpit: let the adapter send (and delay) what is queued first
            try:
                line = self._reader.read_line()
            except LineTooLong:
                self._sasl = None  # an over-long SASL response ends the exchange
                self._violation("command line too long", self.last_command)
                self._error(replies.LINE_TOO_LONG)
                continue
            if line is None:
                return self._closed_event(quit=False) if self._eof else None
            if self.reject_bare_newline and self._reader.bare_lf:
                self._sasl = None  # a refused line also ends an AUTH exchange
                self._refuse_bare_newline(self.last_command, message=False)
                continue
            if self._sasl is None:
                self._command(line)
            else:  # a response to a 334 challenge: never a command, never logged
                self._sasl_response(line)

    def accept(self, reply: Reply | None = None) -> None:
        """Grant the pending request; ``reply`` overrides the default text (e.g. queue ID)."""
        event = self._take_pending()
        next_state, default = ON_ACCEPT[type(event)]
        if isinstance(event, Helo):
            self._reset_transaction()
            self.helo_name, self.extended = event.name, event.extended
            self._helo_again = False
            default = self._helo_reply(event.extended)
        elif isinstance(event, MailFrom):
            self._smtputf8 = "SMTPUTF8" in event.params
        elif isinstance(event, RcptTo):
            self._recipients += 1
        elif isinstance(event, Data):
            if event.bdat:  # the chunk's bytes follow; its reply comes once they are read
                next_state, default, reply = State.BDAT, None, None
            else:
                self._reader.start_data()
                self._reader.bare_lf = False  # the message's own, for reject
        elif isinstance(event, MessageEnd):
            self._end_transaction()
            self.error_count = 0  # Postfix counts errors "without delivering mail"
        elif isinstance(event, Auth):
            self.authenticated = True
        elif isinstance(event, StartTls):
            self._forget_plaintext()
        elif isinstance(event, Xclient):  # back to the greeting, keeping what XCLIENT said
            attributes = event.attributes
            helo, proto = attributes.get("HELO"), attributes.get("PROTO")
            self.helo_name, self.extended = helo, proto == "ESMTP"
            self.authenticated = bool(attributes.get("LOGIN"))  # the proxy's own AUTH is not
            self._helo_again = False  # a new start under TLS: HELO as optional as at connect
            default = Reply(220, self.settings.banner)
        if next_state is not None:
            self.state = next_state
        if reply or default:
            self._out.append((reply or default).encode())

    def reject(self, reply: Reply) -> None:
        """Refuse the pending request with a 4xx/5xx reply."""
        if not reply.is_error:
            raise ValueError(f"reject() needs a 4xx/5xx reply, got {reply}")
        event = self._take_pending()
        if isinstance(event, Data) and event.bdat:
            if reply.code != 421:  # the chunk is still read, then refused
                self._refuse_chunk(reply)
                return
            self._chunk = None  # closing: nothing more is read
        fallback = ON_REJECT[type(event)]
        if fallback is not None:
            self.state = fallback
            self._end_transaction()
        if reply.code == 421:
            self._out.append(reply.encode())
            self.state = State.CLOSED
            return
        self._error(reply)

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake (after STARTTLS, or at once on smtps)."""
        self.tls_active = True

    def tls_refusal(self) -> Reply | None:
        """530 while smtpd_tls_security_level = encrypt and TLS is not active yet: Postfix's
        answer to every command but those in PRE_TLS."""
        if self.settings.require_tls and not self.tls_active:
            return replies.NEED_STARTTLS
        return None

    # -- internals --------------------------------------------------------------------------

    def _forget_plaintext(self) -> None:
        """RFC 3207 §4.2: after 220 to STARTTLS, discard what the client pipelined in plaintext
        (CVE-2011-0411: it would be read as if sent under TLS) and everything learnt before
        TLS: HELO/EHLO, any transaction, and an AUTH (as Postfix logs the client out)."""
        self._reader = self._new_reader()
        self._reset_transaction()
        self.helo_name, self.extended = None, False
        self._helo_again = True
        self.authenticated = False

    def _new_reader(self):
        return self._reader_class(self.settings.line_length_limit)

    def _take_pending(self) -> Event:
        event = self._pending
        if event is None:
            raise RuntimeError("no request is waiting for an answer")
        self._pending = None
        return event

    def _closed_event(self, *, quit: bool) -> Closed | None:
        if self._closed_reported:
            return None
        self._closed_reported = True
        during = self.last_command
        self.state = State.CLOSED
        return Closed(during=during, quit=quit, hangup=self._hangup)

    def _command(self, line: bytes) -> None:
        if b"\0" in line:  # no command holds a NUL: never let one reach a parser or a log
            self._violation("NUL character in command", self.last_command,
                            detail=escape_command(line[:100]))
            self._error(replies.BAD_SYNTAX)
            return
        if not line.isascii() and not _valid_utf8(line):  # RFC 6531 §3.1, as Postfix
            self._error(replies.BAD_UTF8)
            return
        verb, arg = split_command(line)
        if not verb:
            self._error(replies.BAD_SYNTAX)
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            self.last_command = "UNKNOWN"
            self._count("unknown")
            self._error(replies.NOT_RECOGNIZED)
            return
        self.last_command = verb
        self._count(verb.lower())
        if (self.settings.forbid_unauth_pipelining and len(self._reader)
                and (not self.extended or verb in PIPELINE_LAST)):
            # Postfix: input waiting after a command that must end a group (or after any
            # command before EHLO announced PIPELINING) was sent before our reply was read
            self._violation("improper command pipelining", verb, closing=True,
                            detail=escape_command(self._reader.peek(100),
                                                  sasl_response=verb == "AUTH"))
            self._out.append(replies.SYNCHRONIZATION_ERROR.encode())
            self.state = State.CLOSED
            return
        if verb not in PRE_TLS and (refusal := self.tls_refusal()) is not None:
            self._error(refusal)
            return
        sequence_error = SEQUENCE_ERRORS.get((self.state, verb))
        if sequence_error is not None:
            self._error(sequence_error)
            return
        try:
            result = handler(self, arg)
        except GrammarError as error:
            self._error(error.reply)
            return
        if isinstance(result, Reply):
            if result.is_error:
                self._error(result)
            else:
                self._out.append(result.encode())
        elif result is not None:
            self._ready.append(result)

    def _error(self, reply: Reply) -> None:
        """Send a 4xx/5xx reply to a client command and count it; at smtpd_hard_error_limit,
        Postfix's 421 follows and the session ends."""
        self._out.append(reply.encode())
        self.error_count += 1
        limit = self.settings.hard_error_limit
        if limit and self.error_count >= limit and self.state is not State.CLOSED:
            self._out.append(Reply(421, f"4.7.0 {self.settings.hostname} "
                                        "Error: too many errors").encode())
            self._ready.clear()
            self._violation("too many errors", self.last_command, closing=True)
            self.state = State.CLOSED

    def _violation(self, what: str, after: str, *, detail: str = "",
                   closing: bool = False) -> None:
        self._ready.append(Violation(what=what, after=after, detail=detail, closing=closing))

    def _refuse_bare_newline(self, after: str, *, message: bool) -> None:
        """smtpd_forbid_bare_newline = reject: the command, or the whole message, is refused
        with the configured code (521 also ends the session)."""
        self._reader.bare_lf = False
        code = self.settings.bare_newline_reject_code
        closing = code == 521
        if message:
            self.state = State.IDLE
            self._end_transaction()
            self._ready.append(Reset())  # the transaction is abandoned
        self._violation("bare <LF> received", after, closing=closing)
        self._error(Reply(code, f"5.5.2 {self.settings.hostname} Error: bare <LF> received"))
        if closing:
            self.state = State.CLOSED

    def _count(self, name: str) -> None:
        self.command_counts[name] = self.command_counts.get(name, 0) + 1

    def _reset_transaction(self) -> None:
        if self._transaction_open():
            self._ready.insert(0, Reset())
        self.state = State.IDLE
        self._end_transaction()

    def _transaction_open(self) -> bool:
        """The application holds a transaction (a BDAT one that failed was already reset)."""
        return self.state in (State.MAIL, State.RCPT) or (
            self.state is State.BDAT and not self._bdat_failed)

    def _end_transaction(self) -> None:
        self._recipients = 0
        self._bdat_bytes = 0
        self._bdat_failed = False

    # -- BDAT chunks (RFC 3030) -------------------------------------------------------------

    def _read_chunk(self) -> bool:
        """Take what has arrived of the current chunk; False when nothing could be done."""
        chunk = self._chunk
        if chunk.left:
            data = self._reader.read_exact(chunk.left)
            if not data:
                return False
            chunk.left -= len(data)
            if chunk.refusal is None:
                self._ready.append(MessageChunk(data))
            if chunk.left:
                return True
        self._chunk = None
        if chunk.refusal is not None:
            self._out.append(chunk.refusal.encode())
        elif chunk.last:
            self._bdat_bytes += chunk.size
            self._ready.append(MessageEnd(chunked_size=self._bdat_bytes))
        else:
            self._bdat_bytes += chunk.size
            self._out.append(replies.chunk_received(chunk.size).encode())
        return True

    def _refuse_chunk(self, reply: Reply) -> None:
        """Read and drop the current chunk's bytes, then answer ``reply``. The transaction is
        over: at once after LAST, else once RSET or BDAT LAST comes (Postfix's skip_bdat)."""
        if self._transaction_open():
            self._ready.append(Reset())
        self._chunk.refusal = reply
        if self._chunk.last:
            self.state = State.IDLE
            self._end_transaction()
        else:
            self.state = State.BDAT
            self._bdat_failed = True

    def _helo_reply(self, extended: bool) -> Reply:
        if not extended:
            return Reply(250, self.settings.hostname)
        lines = [self.settings.hostname, "PIPELINING"]
        limit = self.settings.message_size_limit  # RFC 1870 §4: bare SIZE when unlimited
        lines.append(f"SIZE {limit}" if limit else "SIZE")
        lines.append("VRFY")
        if self.settings.starttls and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_offered:
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        if self.xclient_allowed:
            lines.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
        if self.xforward_allowed:
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN"]
        lines += ["SMTPUTF8", "CHUNKING"]  # RFC 6531, RFC 3030
        return Reply(250, "\n".join(lines))

    @property
    def auth_offered(self) -> bool:
        """AUTH is enabled, and TLS is active unless smtpd_tls_auth_only is off (RFC 4954 §4:
        plaintext passwords only under TLS)."""
        settings = self.settings
        return settings.auth_enabled and (self.tls_active or not settings.tls_auth_only)

    def _sasl_response(self, line: bytes) -> None:
        text = line.decode("ascii", "surrogateescape").strip(" ")
        self._sasl_step(self._sasl.respond(text))

    def _sasl_step(self, step: sasl.Step) -> None:
        """Send the challenge, or end the exchange: credentials become an Auth request, a
        refusal is answered at once (and reported, for the log and the failure count)."""
        if isinstance(step, sasl.Challenge):
            self._out.append(Reply(334, step.text).encode())
            return
        exchange, self._sasl = self._sasl, None
        if isinstance(step, sasl.Credentials):
            self._ready.append(Auth(exchange.name, step.username, step.password))
        else:
            self._error(step.reply)  # counted as an error, as Postfix's 5xx AUTH replies
            self._ready.append(AuthRefused(exchange.name, step.reason, step.reply))

    # -- one handler per verb: returns a Reply to send now, or a request event --------------

    def _helo(self, arg: str, *, extended: bool) -> Event | Reply:
        if not arg:
            return replies.EHLO_SYNTAX if extended else replies.HELO_SYNTAX
        return Helo(name=arg, extended=extended)

    def _mail(self, arg: str) -> Event | Reply:
        if self._helo_again and self.helo_name is None:
            return replies.NEED_HELO
        if self.settings.auth_required and not self.authenticated:
            return replies.AUTH_REQUIRED
        sender, params = parse_mail_from(arg)
        # Postfix's allow_min_user = no: an address starting with "-" would read as an option
        # to a command it reaches (pipe transports, sendmail); refused as a syntax error
        if sender[:1] == "-":
            return replies.BAD_SENDER
        kept: dict[str, str | None] = {}
        for key, value in params:  # left to right, the first error answers (as Postfix)
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()):
                    return replies.BAD_SIZE
                limit = self.settings.message_size_limit
                if limit and int(value) > limit:
                    return replies.TOO_BIG
                kept[key] = value
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_BODY
                kept[key] = value
            elif key in MAIL_DSN_PARAMETERS:
                if (refusal := _keep_dsn_parameter(MAIL_DSN_PARAMETERS, key, value, kept)):
                    return refusal
            elif key == "SMTPUTF8":  # RFC 6531 §3.4: a keyword without a value
                if value is not None:
                    return replies.unsupported_option(f"{key}={value}")
                kept[key] = None
            elif key == "AUTH" and value is not None:
                # RFC 4954 §5: the original submitter, kept for the log; one that is not
                # xtext is "unknown" (<>)
                if not self.settings.auth_enabled:
                    return replies.AUTH_PARAMETER_DISABLED
                if key in kept:
                    return replies.AUTH_PARAMETER_TWICE
                kept[key] = value if value == "<>" or XTEXT.fullmatch(value) else "<>"
            else:
                return replies.unsupported_option(key)
        if not sender.isascii() and "SMTPUTF8" not in kept:
            return replies.UNICODE_NOT_DECLARED
        return MailFrom(sender=sender, params=kept)

    def _rcpt(self, arg: str) -> Event | Reply:
        recipient, params = parse_rcpt_to(arg)
        if recipient[:1] == "-":  # allow_min_user = no, as in _mail
            return replies.BAD_RECIPIENT
        kept: dict[str, str | None] = {}
        for key, value in params:
            if key not in RCPT_DSN_PARAMETERS:
                return replies.unsupported_option(key)
            if (refusal := _keep_dsn_parameter(RCPT_DSN_PARAMETERS, key, value, kept)):
                return refusal
        if not self._smtputf8 and not (recipient.isascii() and kept.get("ORCPT", "").isascii()):
            return replies.UNICODE_NOT_DECLARED
        if self._recipients >= self.settings.recipient_limit:
            return replies.TOO_MANY_RECIPIENTS
        return RcptTo(recipient=recipient, params=kept)

    def _data(self, arg: str) -> Event | Reply:
        return replies.NO_ARGUMENTS if arg else Data()

    def _bdat(self, arg: str) -> Event | Reply | None:
        """``BDAT <size> [LAST]`` (RFC 3030 §2), the checks in Postfix's order. Every chunk
        with a readable size is read, whatever becomes of it."""
        parsed = _bdat_arguments(arg)
        if parsed is None:
            self.state = State.CLOSED
            self._hangup = True
            return replies.BDAT_SYNTAX
        size, last = parsed
        self._chunk = _Chunk(size=size, last=last, left=size)
        limit = self.settings.message_size_limit
        if size == 0 and not last:
            refusal = replies.NULL_BDAT
        elif self._bdat_failed:
            refusal = replies.chunk_discarded(size)
        elif self.state in BDAT_SEQUENCE_ERRORS:
            refusal = BDAT_SEQUENCE_ERRORS[self.state]
        elif limit and self._bdat_bytes + size > limit:
            refusal = replies.CHUNK_TOO_BIG
        elif self.state is State.RCPT:
            return Data(bdat=True)  # the first chunk: the application opens the message
        else:
            return None  # a further chunk of the open message
        self._refuse_chunk(refusal)
        return None

    def _rset(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENTS
        self._reset_transaction()
        return replies.OK

    def _noop(self, arg: str) -> Reply:
        return replies.OK

    def _quit(self, arg: str) -> Reply:
        self.state = State.CLOSED
        return replies.BYE

    def _vrfy(self, arg: str) -> Reply:
        return replies.VRFY_NO_DISCLOSURE if arg else replies.VRFY_SYNTAX

    def _help(self, arg: str) -> Reply:
        return replies.HELP

    def _starttls(self, arg: str) -> Event | Reply:
        if arg:
            return replies.STARTTLS_SYNTAX
        if self.tls_active:
            return replies.TLS_ALREADY_ACTIVE
        if not self.settings.starttls:
            return replies.NOT_IMPLEMENTED
        return StartTls()
    def _auth(self, arg: str) -> Reply | None:
        """RFC 4954 AUTH, with Postfix's checks in Postfix's order; then the mechanism's
        exchange starts (an initial response may complete it at once)."""
        if not self.settings.auth_enabled:
            return replies.AUTH_NOT_ENABLED
        if self.state in (State.MAIL, State.RCPT, State.BDAT):
            return replies.AUTH_IN_TRANSACTION
        if not self.auth_offered:
            return replies.AUTH_NEEDS_TLS
        if self.authenticated:
            return replies.AUTH_ALREADY
        words = arg.split()
        if not 1 <= len(words) <= 2:
            return replies.AUTH_SYNTAX
        exchange = sasl.begin(words[0])
        if exchange is None:
            name = _MECHANISM_NAME.sub("?", words[0].upper()[:20])  # printable, as Postfix
            self._ready.append(AuthRefused(name, "Invalid authentication mechanism",
                                           replies.AUTH_BAD_MECHANISM))
            return replies.AUTH_BAD_MECHANISM
        self._sasl = exchange
        self._sasl_step(exchange.start(words[1] if len(words) == 2 else None))
        return None

    def _xcommand(self, verb: str, arg: str, allowed: bool) -> Event | Reply:
        """XCLIENT / XFORWARD, checked in Postfix's order: syntax, transaction, authorization,
        then each attribute."""
        if not arg:
            return replies.attribute_syntax(verb)
        if self.state in (State.MAIL, State.RCPT, State.BDAT):
            return replies.MAIL_IN_PROGRESS
        if not allowed:
            return replies.INSUFFICIENT_AUTHORIZATION
        attributes = parse_attributes(verb, arg)
        if isinstance(attributes, Reply):
            return attributes
        return (Xclient if verb == "XCLIENT" else Xforward)(attributes)


def _valid_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_BDAT_SIZE_LIMIT = 2**63 - 1  # Postfix's off_t: a larger count is a syntax error


def _bdat_arguments(arg: str) -> tuple[int, bool] | None:
    """``<size> [LAST]`` → (size, last), or None when malformed (RFC 3030 §2:
    bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF; chunk-size = 1*DIGIT)."""
    words = arg.split(" ")
    words = [word for word in words if word]
    if not 1 <= len(words) <= 2:
        return None
    count = words[0]
    if not (count.isascii() and count.isdigit()) or int(count) > _BDAT_SIZE_LIMIT:
        return None
    if len(words) == 2 and words[1].upper() != "LAST":
        return None
    return int(count), len(words) == 2


def _keep_dsn_parameter(table: dict, key: str, value: str | None,
                        kept: dict[str, str | None]) -> Reply | None:
    """Check an RFC 3461 parameter and keep its value; the reply when it is malformed or
    repeated (each may appear at most once per command)."""
    check, refusal = table[key]
    normalised = None if key in kept else check(value)
    if normalised is None:
        return refusal
    kept[key] = normalised
    return None


_MECHANISM_NAME = re.compile(r"[^A-Z0-9_-]")  # RFC 4422 §3.1 mechanism name characters

_HANDLERS = {
    "EHLO": lambda s, a: s._helo(a, extended=True),
    "HELO": lambda s, a: s._helo(a, extended=False),
    "MAIL": ServerSession._mail,
    "RCPT": ServerSession._rcpt,
    "DATA": ServerSession._data,
    "BDAT": ServerSession._bdat,
    "RSET": ServerSession._rset,
    "NOOP": ServerSession._noop,
    "QUIT": ServerSession._quit,
    "VRFY": ServerSession._vrfy,
    "HELP": ServerSession._help,
    "STARTTLS": ServerSession._starttls,
    "AUTH": ServerSession._auth,
    "XCLIENT": lambda s, a: s._xcommand("XCLIENT", a, s.xclient_allowed),
    "XFORWARD": lambda s, a: s._xcommand("XFORWARD", a, s.xforward_allowed),
}
