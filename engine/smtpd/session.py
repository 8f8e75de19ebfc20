"""The asyncio adapter of one SMTP server connection.

Bytes in → ServerSession → events answered here (relay control, cleanup, spool commit) → replies
out in one write per batch, so a pipelined batch is answered in order and in one packet. The
``250 … queued as`` reply is sent only after the spool has committed and synced the message.
Talks to untrusted clients; everything it learns from them passes through the sans-I/O core.
This module keeps the core adapter: connection lifecycle, the event pump, the transaction
events, timers and log lines. Each other concern is a mixin in its own module, state staying
on the one SmtpdProtocol object: engine.smtpd.proxied (PROXY header, XCLIENT, XFORWARD),
engine.smtpd.auth (AUTH), engine.smtpd.starttls (STARTTLS, smtps) and engine.smtpd.limits
(connection limits and anvil rates).
"""

import asyncio
import fcntl
import ssl
import struct
import termios
import time
from dataclasses import dataclass, field, replace

from engine.auth.passwd_file import PasswordFile
from engine.cleanup import Cleanup, MessageBuilder, Origin, RecipientRequest, neuter_helo
from engine.config import Config, Listener
from engine.config.settings import AUTH_REQUIRED_SERVICES, SUBMISSION_SERVICES
from engine.log import Maillog
from engine.policy.relay import address_in
from engine.policy.restrictions import CONFIG_ERROR, Facts, Policy, SessionChecks
from engine.smtp import replies, server
from engine.smtp.replies import Reply
from engine.smtpd.anvil import Anvil
from engine.smtpd.auth import AuthMixin
from engine.smtpd.limits import LimitsMixin
from engine.smtpd.proxied import ProxiedMixin
from engine.smtpd.starttls import StartTlsMixin
from engine.spool import SpoolFull


@dataclass
class SmtpdContext:
    """What every session of a listener shares."""

    config: Config
    cleanup: Cleanup
    maillog: Maillog
    sessions: set = field(default_factory=set)  # shared by every listener of the worker
    listener: Listener = field(default_factory=Listener)  # its service, TLS mode, PROXY …
    anvil: Anvil = field(default_factory=Anvil)  # per-client counters, shared by every listener
    # AUTH's credentials (smtpd_sasl_password_file), shared by the worker's listeners
    authenticator: PasswordFile | None = None
    settings: server.Settings | None = None
    tls: ssl.SSLContext | None = None  # engine.tls.server.server_context: STARTTLS and smtps
    policy: Policy | None = None  # the restriction lists, compiled once from config
    resolver: object | None = None  # engine.dns.Resolver, made when a list needs DNS

    def __post_init__(self) -> None:
        config = self.config
        if self.authenticator is None and config.smtpd_sasl_password_file:
            self.authenticator = PasswordFile(config.smtpd_sasl_password_file)
        if self.policy is None:
            self.policy = Policy(config)
        if self.settings is None:
            submission = self.listener.service in SUBMISSION_SERVICES
            tls_level = config.tls_security_level(self.listener.service) if self.tls else "none"
            self.settings = server.Settings(
                hostname=config.myhostname,
                banner=config.expand(config.smtpd_banner),
                message_size_limit=config.message_size_limit,
                recipient_limit=config.smtpd_recipient_limit,
                line_length_limit=config.line_length_limit,
                auth_enabled=self.authenticator is not None and (
                    submission or config.smtpd_sasl_auth_enable),
                tls_auth_only=config.smtpd_tls_auth_only,
                auth_required=self.listener.service in AUTH_REQUIRED_SERVICES,
                starttls=tls_level != "none",
                require_tls=tls_level == "encrypt",
                hard_error_limit=config.smtpd_hard_error_limit,
                soft_error_limit=(config.smtpd_soft_error_limit
                                  if config.smtpd_error_sleep_time > 0 else 0),
                forbid_unauth_pipelining=config.smtpd_forbid_unauth_pipelining,
                reject_bare_newline=config.smtpd_forbid_bare_newline == "reject",
                bare_newline_reject_code=config.smtpd_forbid_bare_newline_reject_code,
            )


@dataclass
class Transaction:
    queue_id: str
    sender: str
    params: dict  # MAIL FROM's: BODY, RET, ENVID … (engine.smtp.server.MailFrom)
    recipients: list[RecipientRequest] = field(default_factory=list)
    builder: MessageBuilder | None = None


class SmtpdProtocol(ProxiedMixin, AuthMixin, StartTlsMixin, LimitsMixin, asyncio.Protocol):
    """One SMTP connection: the core adapter here, each concern in its mixin's module."""

    def __init__(self, context: SmtpdContext) -> None:
        self.ctx = context
        self.transport: asyncio.Transport | None = None
        self.session = server.ServerSession(context.settings)
        self.origin = Origin()
        self.checks = SessionChecks(context.policy)  # .forget_client() when the client changes
        self._policy_task: asyncio.Task | None = None  # a DNS restriction being answered
        self.txn: Transaction | None = None
        self._commit_task: asyncio.Task | None = None
        self._paused_by: set[str] = set()  # why reading is paused: "commit", "write"
        self._closed_by_us = False  # a 421 of ours ended it: no "lost connection" line
        self._last_activity = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # over smtpd_connection_limit: answered 421, never a session
        self._sasl_method = ""  # the mechanism of the successful AUTH, for the client= line
        self._anvil_client: str | None = None  # counted by anvil.connect (not an exception)
        self._pregreet = False  # input was waiting before the greeting: 554 on arrival
        self._deadline: float | None = None  # smtpd_per_request_deadline: this request's
        self._tarpit: asyncio.TimerHandle | None = None  # smtpd_error_sleep_time running
        self._held: list[bytes] = []  # replies held back by the tarpit
        self._handshake: asyncio.Task | None = None  # the TLS handshake under way
        self._ended = False  # _end ran: the session's slot and anvil count are given back
        # a proxy_protocol listener: the PROXY header read so far (None once done, or never)
        self._proxy_header: bytearray | None = None
        self._proxy_timer: asyncio.TimerHandle | None = None
        self._after_header = b""  # smtps: the bytes after the header are the TLS handshake's
        # XFORWARD attributes for the next transaction (None: nothing forwarded)
        self._xforward: dict[str, str | None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self.ctx.listener.proxy_protocol:  # no greeting before the header names the client
            self._proxy_header = bytearray()
            loop = asyncio.get_running_loop()
            self._proxy_timer = loop.call_later(self.ctx.config.smtpd_upstream_proxy_timeout,
                                                self._proxy_failed, "timeout error")
            return
        self._begin_session(self._peer_ip())

    def _peer_ip(self) -> str:
        peer = self.transport.get_extra_info("peername") or ("", 0)
        return peer[0]

    def _begin_session(self, client_ip: str) -> None:
        """The client's address is known (from the socket, or later from a PROXY header):
        apply the connection limits, log the connect and send the greeting."""
        self.origin.client_ip = client_ip
        self._authorize_x_commands()
        limit = self.ctx.config.smtpd_connection_limit
        if limit and len(self.ctx.sessions) >= limit:
            self._refuse(limit)
            return
        self.ctx.sessions.add(self)
        self._log(f"connect from {self.origin.client}")
        self._arm_timer()
        config = self.ctx.config
        if address_in(client_ip, config.bare_newline_exclusions):
            self.session.reject_bare_newline = False  # normalize, never reject, for these
        refusal = self._anvil_connect(client_ip)
        if refusal is not None:
            self._closed_by_us = True
            self.session.replace_greeting(refusal)  # 421 instead of the 220, then close
            self._pump()
            return
        if self.ctx.listener.service == "smtps":  # RFC 8314: TLS first; the greeting after it
            self._start_tls()
            return
        if config.smtpd_forbid_unauth_pipelining and (
                self.session.pending_input or _bytes_waiting(self.transport)):
            self._pregreet = True  # the client spoke first: answered when its bytes are read
            if self.session.pending_input:
                self._synchronization_error()
            return
        self._flush()

    def _synchronization_error(self) -> None:
        self._pregreet = False
        self._closed_by_us = True
        self.session.synchronization_error()
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self._proxy_header is not None:
            self._proxy_received(data)
            return
        if self._refused:
            return
        now = self._last_activity = time.monotonic()
        self.session.receive_data(data)
        if self._pregreet:
            self._synchronization_error()
            return
        config = self.ctx.config
        if config.smtpd_per_request_deadline:
            timeout = config.smtpd_timeout
            if self._deadline is None:
                self._deadline = now + timeout  # a request begins
            elif self.session.state is server.State.DATA:  # smtpd_min_data_rate earns time
                self._deadline = min(self._deadline + len(data) / config.smtpd_min_data_rate,
                                     now + timeout)
        self._pump()
        if self._deadline is not None and not self.session.pending_input and (
                self.session.state is not server.State.DATA):
            self._deadline = None  # every request received is complete

    def eof_received(self) -> bool:
        if self._proxy_header is not None:
            self._proxy_received(b"", final=True)
        if self._refused:
            return False
        self.session.receive_data(b"")
        self._pump()
        return False

    def pause_writing(self) -> None:
        """The client is not reading our replies: stop reading its commands (bounded memory)."""
        self._pause("write")

    def resume_writing(self) -> None:
        self._resume("write")

    def _pause(self, reason: str) -> None:
        if not self._paused_by and self.transport is not None:
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused_by.discard(reason)
        if not self._paused_by and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def _committing(self) -> bool:
        return self._commit_task is not None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
        if self._proxy_header is not None:
            return  # never a session
        if self._refused or self._handshake is not None:  # a failed handshake ends it itself
            return
        self._end()

    def _end(self) -> None:
        """The connection is gone: report it to the core (the disconnect lines), stop timing,
        and give back the session's slot and its anvil count. Once only, whoever calls first
        (connection_lost, a failed or cut TLS handshake); the slot and the count are given back
        even if reporting fails, or a stuck session would count against the limits forever."""
        if self._ended:
            return
        self._ended = True
        try:
            self.session.receive_data(b"")
            self._pump()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self._tarpit is not None:
                self._tarpit.cancel()
                self._tarpit = None
            self.ctx.sessions.discard(self)
            if self._anvil_client is not None:
                self.ctx.anvil.disconnect(self._anvil_client)
                self._anvil_client = None

    # -- the event pump ----------------------------------------------------------------------

    def _pump(self) -> None:
        session = self.session
        soft_limit = session.settings.soft_error_limit
        while self._tarpit is None:  # else the delayed reply goes first; _end_tarpit pumps
            while (event := session.next_event()) is not None:
                handler = _EVENT_HANDLERS[type(event)]
                handler(self, event)
            sent = self._flush()
            # at the soft error limit the core stops after each reply (so that each can be
            # delayed): go on with the commands it still holds
            if not (sent and soft_limit and session.error_count >= soft_limit):
                return

    def _flush(self) -> bool:
        """Write the queued replies; True when some went out now (not held by the tarpit)."""
        out = self.session.data_to_send()
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if out:
            config = self.ctx.config
            if self._tarpit is not None or (
                    config.smtpd_error_sleep_time > 0
                    and self.session.error_count > config.smtpd_soft_error_limit):
                self._hold(out)  # smtpd_soft_error_limit passed: every reply is delayed
                return False
            transport.write(out)
        if self.session.closed and not self._committing:
            transport.close()
        return bool(out)

    def _hold(self, out: bytes) -> None:
        self._held.append(out)
        if self._tarpit is None:
            self._pause("tarpit")
            loop = asyncio.get_running_loop()
            self._tarpit = loop.call_later(self.ctx.config.smtpd_error_sleep_time,
                                           self._end_tarpit)

    def _end_tarpit(self) -> None:
        self._tarpit = None
        out = b"".join(self._held)
        self._held.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(out)
        self._resume("tarpit")
        self._pump()  # the next command the core held back, or the close

    # -- restrictions: each decision point asks SessionChecks, synchronously unless a list of
    # that stage needs DNS; then a task answers later (the core waits, input buffered).

    def _facts(self, *, helo: str | None = None, sender: str | None = None,
               recipient: str | None = None) -> Facts:
        origin = self.origin
        return Facts(origin.client_ip, origin.client_name, helo or origin.helo,
                     sender, recipient, origin.sasl_username)

    def _decide(self, stage: str, facts: Facts, answer) -> None:
        """Evaluate the restrictions of ``stage``; ``answer(refusal or None)``."""
        checks = self.checks
        if not checks.needs_dns(stage):
            answer(checks.decide(stage, facts))
            return
        self._pause("policy")
        self._policy_task = asyncio.get_running_loop().create_task(
            self._decide_later(stage, facts, answer))

    async def _decide_later(self, stage: str, facts: Facts, answer) -> None:
        ctx = self.ctx
        if ctx.resolver is None:
            from engine.dns import Resolver  # only when a restriction needs DNS

            ctx.resolver = Resolver(ctx.config)
        try:
            refusal = await self.checks.decide_async(stage, facts, ctx.resolver)
        except Exception as error:  # noqa: BLE001 - a failed check defers, never permits
            self._log(f"warning: {stage} restriction check failed: {error!r}")
            refusal = CONFIG_ERROR
        self._policy_task = None
        answer(refusal)
        self._resume("policy")
        self._pump()

    def _on_helo(self, event: server.Helo) -> None:
        self.origin.esmtp = event.extended
        self._decide("HELO", self._facts(helo=event.name),
                     lambda refusal: self._answer_helo(event, refusal))

    def _answer_helo(self, event: server.Helo, refusal: Reply | None) -> None:
        origin = self.origin
        if refusal is not None:  # as Postfix: logged with the refused name, which is not kept
            kept, origin.helo = origin.helo, event.name
            self._log_reject("EHLO" if event.extended else "HELO", refusal)
            origin.helo = kept
            self.session.reject(refusal)
            return
        origin.helo = neuter_helo(event.name)  # once per HELO, not per message
        self.session.accept()

    def _on_mail(self, event: server.MailFrom) -> None:
        if self._over_rate("message", self.ctx.config.smtpd_client_message_rate_limit,
                           "Message delivery request"):  # before the restrictions, as Postfix
            self.session.reject(Reply(450, "4.7.1 Error: too much mail from "
                                           f"{self.origin.client_ip}"))
            return
        self._decide("MAIL", self._facts(sender=event.sender),
                     lambda refusal: self._answer_mail(event, refusal))

    def _answer_mail(self, event: server.MailFrom, refusal: Reply | None) -> None:
        if refusal is not None:
            self._log_reject("MAIL", refusal, sender=event.sender)
            self.session.reject(refusal)
            return
        queue_id = self.ctx.cleanup.new_queue_id()
        self.txn = Transaction(queue_id=queue_id, sender=event.sender, params=event.params)
        line = f"{queue_id}: client={self.origin.client}"
        if self.origin.sasl_username:  # Postfix's smtpd_sasl_mail_log
            line += f", sasl_method={self._sasl_method}, sasl_username={self.origin.sasl_username}"
        if event.params.get("AUTH", "<>") != "<>":
            line += f", sasl_sender={event.params['AUTH']}"
        self._log(line + self._forwarded_log())
        self.session.accept()

    def _on_rcpt(self, event: server.RcptTo) -> None:
        if self._over_rate("recipient", self.ctx.config.smtpd_client_recipient_rate_limit,
                           "Recipient address"):  # before the restrictions, as Postfix
            self.session.reject(Reply(450, "4.7.1 Error: too many recipients from "
                                           f"{self.origin.client_ip}"))
            return
        facts = self._facts(sender=self.txn.sender, recipient=event.recipient)
        checks = self.checks
        if checks.needs_dns("RCPT"):
            self._decide("RCPT", facts, lambda refusal: self._answer_rcpt(event, refusal))
        else:  # the per-recipient hot path: no closure, no task
            self._answer_rcpt(event, checks.decide("RCPT", facts))

    def _answer_rcpt(self, event: server.RcptTo, refusal: Reply | None) -> None:
        if refusal is not None:
            self._log_reject("RCPT", refusal, to=event.recipient)
            self.session.reject(refusal)
            return
        self.txn.recipients.append(RecipientRequest(
            event.recipient, notify=event.params.get("NOTIFY") or "",
            orcpt=event.params.get("ORCPT") or ""))
        self.session.accept()

    def _on_data(self, event: server.Data) -> None:
        """DATA, or the first BDAT chunk: the message builder opens here either way."""
        recipients = self.txn.recipients
        only = recipients[0].address if len(recipients) == 1 else None
        self._decide("DATA", self._facts(sender=self.txn.sender, recipient=only),
                     lambda refusal: self._answer_data(refusal, only))

    def _answer_data(self, refusal: Reply | None, only: str | None) -> None:
        if refusal is not None:
            self._log_reject("DATA", refusal, to=only)
            self.session.reject(refusal)
            return
        txn = self.txn
        params = txn.params
        origin = self._message_origin()
        if "SMTPUTF8" in params:  # this message's Received: says UTF8SMTP…; the spool keeps it
            origin = replace(origin, smtputf8=True)
        txn.builder = self.ctx.cleanup.begin(
            queue_id=txn.queue_id, sender=txn.sender, recipients=txn.recipients,
            origin=origin, body_8bit=(params.get("BODY") or "").upper() == "8BITMIME",
            ret=params.get("RET") or "", envid=params.get("ENVID") or "")
        self.session.accept()

    def _on_chunk(self, event: server.MessageChunk) -> None:
        self.txn.builder.write(event.data)

    def _on_end(self, event: server.MessageEnd) -> None:
        txn, self.txn = self.txn, None
        self._xforward = None  # forwarded attributes last one transaction
        if txn.builder.too_big:
            self._log_reject("END-OF-MESSAGE", replies.TOO_BIG, queue_id=txn.queue_id,
                             sender=txn.sender)
            self.session.reject(replies.TOO_BIG)
            return
        if txn.builder.too_many_hops:  # a mail loop: refused here, as Postfix's smtpd does
            self._log_reject("END-OF-MESSAGE", replies.TOO_MANY_HOPS, queue_id=txn.queue_id,
                             sender=txn.sender)
            self.session.reject(replies.TOO_MANY_HOPS)
            return
        self._pause("commit")
        self._commit_task = asyncio.get_running_loop().create_task(
            self._commit(txn, event.chunked_size))

    async def _commit(self, txn: Transaction, chunked_size: int | None = None) -> None:
        try:
            envelope = await self.ctx.cleanup.enqueue(txn.builder)
        except SpoolFull:
            self._answer_commit(replies.SPOOL_FULL, txn)
            return
        except Exception as error:  # noqa: BLE001 - any storage failure is a 4xx, never a loss
            self._log(f"warning: {txn.queue_id}: queue file write error: {error}")
            self._answer_commit(replies.SPOOL_ERROR, txn)
            return
        self._answer_commit(replies.queued(envelope.queue_id, chunked_size), txn)

    def _answer_commit(self, reply: Reply, txn: Transaction) -> None:
        self._commit_task = None
        if reply.is_error:
            self._log_reject("END-OF-MESSAGE", reply, queue_id=txn.queue_id, sender=txn.sender)
            self.session.reject(reply)
        else:
            self.session.accept(reply)
        self._resume("commit")
        self._pump()

    def _on_reset(self, event: server.Reset) -> None:
        self.txn = None
        self._xforward = None

    def _on_violation(self, event: server.Violation) -> None:
        """Postfix's log line for a broken rule; a closing one is no "lost connection"."""
        client = self.origin.client
        if event.closing:
            self._closed_by_us = True
        if event.what == "improper command pipelining":
            self._log(f"improper command pipelining after {event.after} from {client}: "
                      f"{event.detail}")
        elif event.closing or event.what == "bare <LF> received":
            self._log(f"{event.what} after {event.after} from {client}")
        else:
            detail = f": {event.detail}" if event.detail else ""
            self._log(f"warning: {event.what} after {event.after} from {client}{detail}")

    def _on_closed(self, event: server.Closed) -> None:
        client = self.origin.client
        if not (event.quit or event.hangup or self._closed_by_us):
            self._log(f"lost connection after {event.during} from {client}")
        counts = self.session.command_counts
        summary = " ".join(f"{name}={count}" for name, count in counts.items())
        total = sum(counts.values())
        self._log(f"disconnect from {client} {summary} commands={total}".replace("  ", " "))

    # -- timeouts and shutdown ---------------------------------------------------------------

    def _arm_timer(self) -> None:
        timeout = self.ctx.config.smtpd_timeout
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        """smtpd_timeout: 421 after that long without input, or (smtpd_per_request_deadline)
        when a request that began has not been completed by its deadline."""
        now = time.monotonic()
        timeout = self.ctx.config.smtpd_timeout
        due = self._last_activity + timeout
        if self._deadline is not None:
            due = min(due, self._deadline)
        if now < due or self._committing:
            loop = asyncio.get_running_loop()
            wait = due - now if now < due else timeout
            self._timer = loop.call_at(loop.time() + wait, self._check_timeout)
            return
        self._timer = None
        self._log(f"timeout after {self.session.last_command} from {self.origin.client}")
        self.close_with(Reply(421, f"4.4.2 {self.ctx.config.myhostname} Error: timeout exceeded"))

    def close_with(self, reply: Reply) -> None:
        """End the session from our side with a 421 (timeout, shutdown)."""
        self._closed_by_us = True
        if self._handshake is not None:  # no plaintext reply into a TLS handshake: just close
            handshake, self._handshake = self._handshake, None
            handshake.cancel()
            self.transport.abort()
            self._end()  # no connection_lost reaches us while the handoff holds the socket
            return
        self.session.send_reply(reply)
        self._pump()
        if self.transport is not None:
            self.transport.close()

    # -- logging -----------------------------------------------------------------------------

    def _log(self, text: str) -> None:
        self.ctx.maillog.line("smtpd", text)

    def _log_reject(self, stage: str, reply: Reply, *, to: str | None = None,
                    queue_id: str | None = None, sender: str | None = None) -> None:
        """Postfix's ``QID: reject: RCPT from client: 554 5.7.1 …; from=<> to=<> helo=<>``.
        NOQUEUE until a recipient was accepted (when Postfix creates the queue file)."""
        txn = self.txn
        queue_id = queue_id or (txn.queue_id if txn and txn.recipients else "NOQUEUE")
        sender = sender if sender is not None else (self.txn.sender if self.txn else "")
        parts = [f"from=<{sender}>"]
        if to is not None:
            parts.append(f"to=<{to}>")
        parts += [f"proto={self.origin.protocol}", f"helo=<{self.origin.helo or ''}>"]
        self._log(f"{queue_id}: reject: {stage} from {self.origin.client}: {reply}; "
                  + " ".join(parts))


_EVENT_HANDLERS = {
    server.Helo: SmtpdProtocol._on_helo,
    server.MailFrom: SmtpdProtocol._on_mail,
    server.RcptTo: SmtpdProtocol._on_rcpt,
    server.Data: SmtpdProtocol._on_data,
    server.MessageChunk: SmtpdProtocol._on_chunk,
    server.MessageEnd: SmtpdProtocol._on_end,
    server.StartTls: SmtpdProtocol._on_starttls,
    server.Reset: SmtpdProtocol._on_reset,
    server.Auth: SmtpdProtocol._on_auth,
    server.AuthRefused: SmtpdProtocol._on_auth_refused,
    server.Closed: SmtpdProtocol._on_closed,
    server.Violation: SmtpdProtocol._on_violation,
    server.Xclient: SmtpdProtocol._on_xclient,
    server.Xforward: SmtpdProtocol._on_xforward,
}


def _bytes_waiting(transport: asyncio.Transport) -> int:
    """Bytes the client sent that the kernel holds unread (Postfix's peekfd: FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return struct.unpack("i", raw)[0]
