"""Per-client and per-worker connection limits of an SMTP session (Postfix's anvil checks).

Mixed into engine.smtpd.session.SmtpdProtocol: the worker's smtpd_connection_limit refusal,
and the per-client concurrency, connection-rate, message-rate and recipient-rate limits
counted in the worker's Anvil. Trusts only the client address the session began with.
Uses ``ctx``, ``session``, ``origin``, ``transport`` and sets ``_anvil_client`` (given back
by ``_end``) and ``_refused``; calls the adapter's ``_log``.
"""

from engine.policy.relay import address_in
from engine.smtp.replies import Reply


class LimitsMixin:
    """The limit checks, kept apart from the adapter that calls them at connect, MAIL, RCPT."""

    def _anvil_connect(self, client_ip: str) -> Reply | None:
        """Postfix's per-client connection limits (anvil): the 421 for a client over its
        concurrency or connection rate limit, else None. smtpd_client_event_limit_exceptions
        are not counted at all, as Postfix's smtpd does not tell anvil about them; nor are
        the hosts that may send XCLIENT (as Postfix: the address counted at connect must be
        the one given back at disconnect, and every client behind such a proxy would otherwise
        share the proxy's count and limits)."""
        config = self.ctx.config
        if self.session.xclient_allowed or address_in(client_ip, config.event_limit_exceptions):
            return None
        self._anvil_client = client_ip
        sessions, rate = self.ctx.anvil.connect(client_ip)
        count_limit = config.smtpd_client_connection_count_limit
        rate_limit = config.smtpd_client_connection_rate_limit
        if count_limit and sessions > count_limit:
            what, count = "Connection concurrency", sessions
        elif rate_limit and rate > rate_limit:
            what, count = "Connection rate", rate
        else:
            return None
        self._log(f"warning: {what} limit exceeded: {count} from {self.origin.client} "
                  f"for service {self.ctx.listener.service}")
        return Reply(421, f"4.7.0 {config.myhostname} Error: too many connections "
                          f"from {client_ip}")

    def _over_rate(self, event: str, limit: int, what: str) -> bool:
        """Count a MAIL or RCPT with anvil; True (and the warning logged) when over ``limit``.
        Postfix counts them whether or not they are accepted."""
        if not limit or self._anvil_client is None:
            return False
        count = self.ctx.anvil.count(event, self._anvil_client)
        if count <= limit:
            return False
        self._log(f"warning: {what} rate limit exceeded: {count} from {self.origin.client} "
                  f"for service {self.ctx.listener.service}")
        return True

    def _refuse(self, limit: int) -> None:
        """The worker already serves ``limit`` sessions: 421 instead of the greeting, then close.

        As Postfix's smtpd answers a client anvil refuses; the sessions being served go on."""
        self._refused = True
        self._log(f"warning: connection limit {limit} reached: refusing {self.origin.client}")
        self.transport.write(Reply(421, f"4.7.0 {self.ctx.config.myhostname} "
                                        "Error: too many connections").encode())
        self.transport.close()
