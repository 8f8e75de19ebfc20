"""TLS for an SMTP session: STARTTLS, and smtps's TLS before the greeting.

Mixed into engine.smtpd.session.SmtpdProtocol; engine.tls says how TLS is layered (the
socket handed to the loop's TLS by engine.tls.handoff). A failed or cut handshake ends the
session, never continues it in plaintext. Uses ``ctx``, ``session``, ``origin``,
``transport`` (replaced by the TLS one), ``_handshake``, ``_after_header``, ``_sasl_method``,
``_paused_by``, ``_closed_by_us``, ``_last_activity``; calls the adapter's ``_flush``,
``_end``, ``data_received``, ``_log``.
"""

import asyncio
import time

from engine.smtp import replies, server
from engine.tls.handoff import Handshaken, TlsHandoff
from engine.tls.server import describe as describe_tls


class StartTlsMixin:
    """The STARTTLS event and the handshake of a session."""

    def _on_starttls(self, event: server.StartTls) -> None:
        if self.ctx.tls is None:
            self.session.reject(replies.TLS_UNAVAILABLE)
            return
        self.session.accept()  # 220, and the plaintext pipelined behind STARTTLS is gone
        self._flush()
        self._start_tls()

    def _start_tls(self) -> None:
        """Hand the socket to the loop's TLS (engine.tls.handoff keeps any early ClientHello
        bytes for it); no protocol callback reaches us until the handshake is done, and
        smtpd_timeout still covers a stalled handshake."""
        handoff = TlsHandoff(self.transport, self._after_header)  # bytes behind a PROXY header
        self._after_header = b""
        self._handshake = asyncio.get_running_loop().create_task(self._run_handshake(handoff))

    async def _run_handshake(self, handoff: TlsHandoff) -> None:
        """The handshake, then the session goes on over TLS; whatever fails on the way ends
        the session (_end), so that no slot or anvil count outlives the connection. A cut
        connection may come back from start_tls as None (asyncio) or as a transport without
        an SSL object (uvloop): a failure too. close_with cancels this task (and ends the
        session itself) when smtpd_timeout or a shutdown comes first."""
        try:
            done = await handoff.start(self.ctx.tls, timeout=self.ctx.config.smtpd_timeout)
            transport = done.transport
            if (transport is None or transport.is_closing()
                    or transport.get_extra_info("ssl_object") is None):
                raise ConnectionResetError("connection closed during the TLS handshake")
        except Exception as error:  # noqa: BLE001 - every failure ends the session the same way
            self._handshake = None
            self._tls_failed(handoff.transport, error)
            return
        self._handshake = None
        try:
            self._tls_started(done)
        except Exception as error:  # noqa: BLE001 - a bug here must not leak the session
            self._log(f"warning: {self.origin.client}: TLS session setup failed: {error!r}")
            done.transport.abort()
            self._end()

    def _tls_started(self, done: Handshaken) -> None:
        """The handshake succeeded: the session goes on over ``done.transport``."""
        self.transport = transport = done.transport  # from now on every write is encrypted
        transport.set_protocol(self)
        self.origin.tls = describe_tls(transport.get_extra_info("ssl_object"))
        self.origin.helo, self.origin.esmtp = None, False  # the client says EHLO again
        self.origin.sasl_username, self._sasl_method = "", ""  # and AUTH, if it had
        self._log(f"Anonymous TLS connection established from {self.origin.client}: "
                  f"{self.origin.tls}")
        self._last_activity = time.monotonic()
        self.session.tls_started()
        if self._paused_by:
            transport.pause_reading()
        self._flush()  # smtps: the greeting
        if done.data:
            self.data_received(done.data)
        if done.ended:
            self._end()

    def _tls_failed(self, plain: asyncio.Transport, error: Exception) -> None:
        """Postfix's "SSL_accept error from client[ip]: …" and "lost connection after
        STARTTLS"; the connection is closed, not continued in plaintext."""
        if not self._closed_by_us:
            reason = getattr(error, "reason", None)  # OpenSSL's, e.g. "NO_SHARED_CIPHER"
            reason = reason.lower().replace("_", " ") if reason else str(error)
            if isinstance(error, ConnectionError | EOFError) or "eof" in reason or not reason:
                reason = "lost connection"
            self._log(f"SSL_accept error from {self.origin.client}: {reason}")
        plain.abort()
        self._end()
