"""Who the client is when a proxy stands in front: the PROXY header, XCLIENT and XFORWARD.

Mixed into engine.smtpd.session.SmtpdProtocol. On a ``proxy_protocol`` listener the PROXY
header (parsed by engine.smtpd.proxy) comes first and names the client every later decision
and log line is about; XCLIENT and XFORWARD, from hosts authorized at connect, change who the
client is (for the session) or who it was up-stream (for one message). Trusts XCLIENT and
XFORWARD only from smtpd_authorized_xclient_hosts / smtpd_authorized_xforward_hosts.
Uses ``ctx``, ``session``, ``origin``, ``checks``, ``transport``, ``_proxy_header``,
``_proxy_timer``, ``_after_header``, ``_xforward``, ``_sasl_method``, ``_refused``,
``_last_activity``; calls the adapter's ``_begin_session``, ``_peer_ip``, ``_pump``, ``_log``.
"""

import time

from engine.cleanup import Origin
from engine.policy.relay import address_in
from engine.smtp import replies, server
from engine.smtp.xclient import XFORWARD_CLIENT_ATTRIBUTES
from engine.smtpd import proxy


class ProxiedMixin:
    """The PROXY header reading and the XCLIENT / XFORWARD events of a session."""

    def _proxy_received(self, data: bytes, *, final: bool = False) -> None:
        """Bytes while the header is incomplete (held: at most proxy.MAX_HEADER). Once it is
        parsed the session begins, and what followed the header in the same read is the
        client's: its first SMTP bytes, sent before our greeting (which _begin_session judges
        as Postfix does), or on smtps its TLS handshake's."""
        buffer = self._proxy_header
        room = proxy.MAX_HEADER - len(buffer)  # a full buffer always decides: never more
        buffer += data[:room]
        try:
            header = proxy.parse(buffer, final=final)
        except proxy.ProxyError as error:
            shown = server.escape_command(bytes(buffer[:200]))
            self._proxy_failed(f"{error}: {shown}" if buffer else "EOF")
            return
        if header is None:
            return
        rest = bytes(buffer[header.length:]) + data[room:]
        self._proxy_header = None
        self._proxy_timer.cancel()
        self._proxy_timer = None
        smtps = self.ctx.listener.service == "smtps"
        if smtps:
            self._after_header = rest  # taken by _start_tls
        elif rest:
            self._last_activity = time.monotonic()
            self.session.receive_data(rest)
        # LOCAL / UNKNOWN: a connection of the proxy's own (a health check), not proxied
        self._begin_session(header.client[0] if header.client else self._peer_ip())
        self._after_header = b""
        if rest and not smtps and not (self._refused or self.session.closed):
            self._pump()  # smtpd_forbid_unauth_pipelining = no: answered after the greeting

    def _proxy_failed(self, reason: str) -> None:
        """No valid header in time: we cannot tell who the client is or what it may do, so
        as Postfix: a warning, 421 instead of the greeting, and hang up."""
        self._proxy_header = None
        self._proxy_timer.cancel()  # (a no-op when it is what called): no second refusal
        self._proxy_timer = None
        self._refused = True
        self.origin.client_ip = self._peer_ip()
        self._log(f"warning: haproxy read: {reason}")
        self._log(f"connect from {self.origin.client}")
        self.transport.write(replies.local_error(self.ctx.config.myhostname).encode())
        self.transport.close()
        self._log(f"disconnect from {self.origin.client} commands=0")

    # -- XCLIENT and XFORWARD -----------------------------------------------------------------

    def _authorize_x_commands(self) -> None:
        """Who may use XCLIENT / XFORWARD: decided once per connection, from the address the
        session began with (the socket's, or the PROXY header's), as Postfix does. Never from
        an address XCLIENT supplied: that would let an XCLIENT host name itself into
        smtpd_authorized_xforward_hosts, and lock a proxy out after its first XCLIENT."""
        config, client_ip, session = self.ctx.config, self.origin.client_ip, self.session
        xclient = config.smtpd_authorized_xclient_hosts  # empty by default: nothing to parse
        xforward = config.smtpd_authorized_xforward_hosts
        session.xclient_allowed = bool(xclient) and address_in(client_ip, xclient)
        session.xforward_allowed = bool(xforward) and address_in(client_ip, xforward)

    def _on_xclient(self, event: server.Xclient) -> None:
        """The client is now who XCLIENT says: every later decision (mynetworks, limits,
        restrictions) and log line is about it, as in Postfix; who may send XCLIENT and
        XFORWARD stays as decided at connect (_authorize_x_commands)."""
        origin, attributes = self.origin, event.attributes
        if "NAME" in attributes:
            origin.client_name = attributes["NAME"] or "unknown"
        if "ADDR" in attributes:
            origin.client_ip = attributes["ADDR"] or "unknown"
        # LOGIN: as if authenticated (Postfix's sasl_method=XCLIENT); without it the new
        # client is not logged in, whoever the proxy itself authenticated as
        origin.sasl_username = attributes.get("LOGIN") or ""
        self._sasl_method = "XCLIENT" if origin.sasl_username else ""
        origin.helo = attributes.get("HELO")
        origin.esmtp = attributes.get("PROTO") == "ESMTP"
        self.checks.forget_client()
        self._xforward = None
        self.session.accept()

    def _on_xforward(self, event: server.Xforward) -> None:
        """Remembered for the next transaction only; attributes not given stay unavailable."""
        if self._xforward is None:
            self._xforward = {}
        self._xforward.update(event.attributes)
        self.session.accept()

    def _message_origin(self) -> Origin:
        """Who the message came from: the session's client, or — once XFORWARD named any client
        attribute — the up-stream client alone, never a mix of both (XFORWARD_README note 4)."""
        forwarded = self._xforward
        if not forwarded or not XFORWARD_CLIENT_ATTRIBUTES.intersection(forwarded):
            return self.origin
        return Origin(client_name=forwarded.get("NAME") or "unknown",
                      client_ip=forwarded.get("ADDR") or "unknown",
                      helo=forwarded.get("HELO"),
                      local_protocol=forwarded.get("PROTO") or "unknown")

    def _forwarded_log(self) -> str:
        """Postfix's additions to the ``client=`` line: ``, orig_queue_id=…, orig_client=…``."""
        forwarded = self._xforward
        if not forwarded:
            return ""
        parts = ""
        if forwarded.get("IDENT"):
            parts += f", orig_queue_id={forwarded['IDENT']}"
        if XFORWARD_CLIENT_ATTRIBUTES.intersection(forwarded):
            parts += f", orig_client={self._message_origin().client}"
        return parts
