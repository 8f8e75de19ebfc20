"""What the SMTP delivery agent tells TLS-RPT (RFC 8460): for one destination domain, each
TLS session's outcome under the policy that applied to its MX host (MTA-STS, DANE's TLSA
records, or none), appended to the result store (engine.tls.tlsrpt_store). Made only when
``smtp_tlsrpt_enable`` is set: otherwise the delivery path pays one test of that setting.
"""

from __future__ import annotations

from engine.tls.policy import TlsPolicy
from engine.tls.tlsrpt import SessionResult
from engine.tls.tlsrpt_store import ResultStore, today


class Reporter:
    """The recorder of one delivery's sessions to ``domain`` (the policy domain)."""

    def __init__(self, store: ResultStore, domain: str) -> None:
        self.store = store
        self.domain = domain
        self._sts = None  # the MTA-STS policy in force for this delivery, if any
        self.audit: TlsPolicy | None = None  # testing: what the sessions are judged by

    @property
    def sts(self):
        return self._sts

    @sts.setter
    def sts(self, policy) -> None:
        """The MTA-STS policy; in "testing" mode the sessions go opportunistic, but TLS-RPT
        reports what "enforce" would have found (RFC 8461 §5)."""
        self._sts = policy
        self.audit = (TlsPolicy("verify", ("hostname",), webpki=True)
                      if policy is not None and policy.mode == "testing" else None)

    def _policy(self, host: str, policy: TlsPolicy | None) -> tuple[str, tuple, tuple]:
        if policy is not None and policy.level in ("dane", "dane-only"):
            records = tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}"
                            for r in policy.tlsa)
            return "tlsa", records, (host,)  # DANE first: MTA-STS covers the other hosts
        if self._sts is not None and self._sts.mode != "none":
            return "sts", self._sts.lines(), self._sts.mx
        return "no-policy-found", (), ()

    def record(self, result: str, *, host: str = "", policy: TlsPolicy | None = None,
               address: str = "", sending_ip: str = "", reason: str = "",
               policy_type: str | None = None) -> None:
        """One session (or one failure before any session) of ``host``: "success" or an
        RFC 8460 result type. ``policy_type`` forces the policy kind (a failed TLSA lookup
        or policy fetch has no records to show)."""
        kind, strings, mx = self._policy(host, policy)
        if policy_type is not None and policy_type != kind:
            kind, strings, mx = policy_type, (), (host,) if host else ()
        self.store.record(SessionResult(
            today(), self.domain, kind, result, strings, mx, sending_ip, host, address,
            reason[:200]))


def reporter(config, domain: str) -> Reporter | None:
    """A Reporter for a delivery to ``domain``, or None when TLS-RPT is off."""
    if not config.smtp_tlsrpt_enable:
        return None
    return Reporter(ResultStore(config.queue_directory), domain.lower().rstrip("."))
