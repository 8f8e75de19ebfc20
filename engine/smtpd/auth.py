"""SMTP AUTH in the adapter: the password check off the loop, and the failure limit.

Mixed into engine.smtpd.session.SmtpdProtocol; the sans-I/O core (engine.smtp.server) has
decoded the SASL exchange, this checks the credentials against ctx.authenticator in an
executor and counts failures per client address in the worker's anvil
(smtpd_client_auth_failure_limit). Never logs a password or the client's base64.
Uses ``ctx``, ``session``, ``origin``, ``_anvil_client``, ``_sasl_method``, ``_closed_by_us``;
calls the adapter's ``_pause``, ``_resume``, ``_pump``, ``_log``.
"""

import asyncio
import functools

from engine.smtp import replies, server


class AuthMixin:
    """The AUTH and AuthRefused events of a session."""

    def _on_auth(self, event: server.Auth) -> None:
        """Check the password off the event loop (a bcrypt or argon2 check takes tens of ms);
        the core holds later pipelined commands until the answer, as for a spool commit."""
        limit, client = self.ctx.config.smtpd_client_auth_failure_limit, self._anvil_client
        if limit and client is not None and self.ctx.anvil.peek("auth_failure", client) >= limit:
            self._over_auth_failure_limit(limit, reject=True)
            return
        self._pause("auth")
        future = asyncio.get_running_loop().run_in_executor(
            None, self.ctx.authenticator.authenticate, event.username, event.password)
        future.add_done_callback(functools.partial(self._answer_auth, event.mechanism))

    def _answer_auth(self, mechanism: str, future: asyncio.Future) -> None:
        self._resume("auth")
        authenticator = self.ctx.authenticator
        if (error := authenticator.take_reload_error()) is not None:
            self._log(f"warning: smtpd_sasl_password_file: {error}; keeping the previous table")
        if self.session.closed:  # shut down meanwhile: only let the core report the close
            self.session.reject(replies.AUTH_FAILED)
        elif (username := self._auth_result(future)) is not None:
            self.origin.sasl_username, self._sasl_method = username, mechanism
            self.session.accept()
        else:
            self.session.reject(replies.AUTH_FAILED)
            self._auth_failed(mechanism, "authentication failure")
        self._pump()

    def _auth_result(self, future: asyncio.Future) -> str | None:
        try:
            return future.result()
        except Exception as error:  # noqa: BLE001 - a broken hash is a failure, not a crash
            self._log(f"warning: {self.origin.client}: password check failed: "
                      f"{type(error).__name__}")
            return None

    def _on_auth_refused(self, event: server.AuthRefused) -> None:
        """The core already answered; log it, and count a 535 as a failure."""
        if event.reply.code == 535:
            self._auth_failed(event.mechanism, event.reason)
        else:
            self._log(f"warning: {self.origin.client}: SASL {event.mechanism} authentication "
                      f"{event.reason}")

    def _auth_failed(self, mechanism: str, reason: str) -> None:
        """Postfix's warning (never the password nor the client's base64), and the failure
        counted per client address in the worker's anvil (not for the anvil exceptions,
        smtpd_client_event_limit_exceptions): at the limit, 421 and disconnect."""
        self._log(f"warning: {self.origin.client}: SASL {mechanism} authentication failed: "
                  f"{reason}")
        limit, client = self.ctx.config.smtpd_client_auth_failure_limit, self._anvil_client
        if limit and client is not None and self.ctx.anvil.count("auth_failure", client) >= limit:
            self._over_auth_failure_limit(limit, reject=False)

    def _over_auth_failure_limit(self, limit: int, *, reject: bool) -> None:
        """421 and disconnect: after the failure that reached the limit, or at an AUTH from a
        client address already over it (until anvil's time unit ends)."""
        self._log(f"warning: Authentication failure limit exceeded: {limit} from "
                  f"{self.origin.client} for service {self.ctx.listener.service}")
        reply = replies.too_many_auth_failures(self.ctx.config.myhostname)
        self._closed_by_us = True
        if reject:
            self.session.reject(reply)
        elif not self.session.closed:  # (smtpd_hard_error_limit may have said 421 already)
            self.session.send_reply(reply)
