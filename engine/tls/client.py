"""Outbound TLS: the security level per destination and the checks on the server's certificate.

Postfix's model (smtp_tls_security_level, smtp_tls_policy_maps): ``none`` never starts TLS;
``may`` starts it when offered and, when the handshake fails, delivers in plaintext on a new
connection; ``encrypt`` insists on TLS but not on who is at the other end; ``fingerprint``
trusts a server whose certificate digest is listed; ``verify`` and ``secure`` want a chain up to
a CA of ``smtp_tls_CAfile`` and a certificate name that matches (``verify``: the MX host name by
default, ``secure``: the next-hop domain or a subdomain of it). ``dane`` and ``dane-only``
(RFC 7672, engine.tls.dane) look up each MX host's TLSA records before connecting
(``resolve_dane``), only for a host whose MX and address answers were DNSSEC-validated (RFC 7672
§2.2.1-2): DNSSEC-validated usable records make TLS mandatory and the chain must match them;
an insecure MX or host, or no secure records, make ``dane`` ``may`` (RFC 7672 §2.2) and make
``dane-only`` defer; secure records that are all unusable make ``dane`` ``encrypt``.

The standard library's ``ssl`` does the handshake (through the loop's ``start_tls``) with one
CERT_NONE context; ``check_peer`` then judges the certificates the server sent: the chain
against the trusted CAs (engine.tls.trust: smtp_tls_CAfile, smtp_tls_CApath,
tls_append_default_CA), the names by Postfix's match rules (not the browser's), the TLSA
records or the fingerprint. The result is logged as Postfix does: "Verified" (chain and name,
TLSA or fingerprint), "Trusted" (chain only, at any level), "Untrusted" (a certificate not
trusted), "Anonymous" (no certificate); a level that needs more defers after the line.

Pure except for building contexts; trusts the validated Config, nothing from the peer.
"""

from __future__ import annotations

import _ssl
import hashlib
import ssl
from dataclasses import dataclass

from engine.delivery import TransientFailure
from engine.tables import Table, open_table
from engine.tls import dane
from engine.tls.policy import (
    DANE,
    MANDATORY,
    VERIFYING,
    PolicyError,
    TlsPolicy,
    name_matches,
    parse_policy,
    policy_lookup_keys,
    wanted_names,
)
from engine.tls.protocols import parse_protocols
from engine.tls.trust import TrustStore

__all__ = ["MANDATORY", "PolicyError", "PolicyFinder", "PeerCheck", "check_peer", "client_context",
           "not_dane", "resolve_dane"]

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class PolicyFinder:
    """The policy for a next hop as written (route.nexthop_as_written): the first
    smtp_tls_policy_maps entry among its lookup keys (policy.policy_lookup_keys), else
    ``smtp_tls_security_level`` (Postfix's default: none). With
    ``smtp_tls_wrappermode`` the session is TLS from the first byte, so a weaker level than
    encrypt becomes encrypt (Postfix insists on the same)."""

    def __init__(self, config) -> None:
        self.config = config
        self.table: Table | None = (open_table(config.smtp_tls_policy_maps)
                                    if config.smtp_tls_policy_maps else None)
        self.default = self._parse(config.smtp_tls_security_level or "none")

    def _parse(self, text: str) -> TlsPolicy:
        return parse_policy(text, verify_match=self.config.smtp_tls_verify_cert_match,
                            secure_match=self.config.smtp_tls_secure_cert_match)

    def policy(self, nexthop: str) -> TlsPolicy:
        policy = self.default
        if self.table is not None:
            for key in policy_lookup_keys(nexthop):
                value = self.table.get(key)
                if value is not None:
                    policy = self._parse(value)
                    break
        if self.config.smtp_tls_wrappermode and not policy.mandatory:
            policy = TlsPolicy("encrypt")
        return policy


_CONTEXTS: dict[tuple, ssl.SSLContext] = {}


def client_context(config, policy: TlsPolicy) -> ssl.SSLContext:
    """The (cached) context for ``policy``: ``tls_medium_cipherlist`` (without anonymous
    suites above "encrypt", as Postfix). The handshake never checks the chain
    (CERT_NONE): ``check_peer`` does afterwards (engine.tls.trust), so that every level sees
    the session and logs Postfix's line, and only the policy decides whether to go on."""
    ciphers = config.tls_medium_cipherlist
    if ciphers and policy.level not in ("may", "encrypt"):  # these want a certificate
        ciphers += ":!aNULL"
    key = (config.smtp_tls_protocols, ciphers)
    context = _CONTEXTS.get(key)
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ciphers:
            context.set_ciphers(ciphers)
        context.check_hostname = False
        lowest, highest = parse_protocols(config.smtp_tls_protocols)
        context.minimum_version = _VERSIONS[lowest]
        context.maximum_version = _VERSIONS[highest]
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        context.verify_mode = ssl.CERT_NONE
        _CONTEXTS[key] = context
    return context


@dataclass(frozen=True)
class PeerCheck:
    """What ``check_peer`` found: Postfix's trust word for the log, and the deferral text
    when the policy is not met (None: go on)."""

    trust: str
    failure: str | None = None
    detail: str = ""  # why, for the log (a TLSA mismatch)
    result: str = ""  # with a failure: its TLS-RPT result type (RFC 8460 §4.3)


def not_dane(policy: TlsPolicy, why: str, *, cannot_authenticate: bool = False) -> TlsPolicy:
    """What a dane/dane-only policy becomes when DANE does not apply (Postfix's
    dane_incompat): "dane" falls back to "may" (to "encrypt" when TLSA records exist but
    none is usable: TLS without authentication, RFC 7672 §2.2); "dane-only" defers with
    ``why`` (TransientFailure 4.7.5)."""
    if policy.level == "dane-only":
        raise TransientFailure("4.7.5", why)
    return TlsPolicy("encrypt" if cannot_authenticate else "may")


async def resolve_dane(policy: TlsPolicy, resolver, host: str, port: int, *,
                       secure: bool = True) -> TlsPolicy:
    """A dane/dane-only policy made concrete for one MX host (see the module docstring);
    other policies as they are. ``secure``: whether the host's MX and address answers were
    DNSSEC-validated (RFC 7672 §2.2.1-2): if not, no TLSA lookup and no DANE. Raises
    TransientFailure: the TLSA lookup failed (SERVFAIL, bogus: "TLSA lookup error"), or
    dane-only and DANE does not apply."""
    if policy.level not in DANE:
        return policy
    if not secure:
        return not_dane(policy, "non DNSSEC destination")
    answer = await dane.lookup_tlsa(resolver, host, port)
    if answer.secure and answer.records:
        return TlsPolicy("dane", tlsa=answer.records)
    if answer.secure and answer.found:
        return not_dane(policy, "TLSA records unusable", cannot_authenticate=True)
    return not_dane(policy, "no TLSA records found")  # none, or not validated (§2.2)


def peer_chain(ssl_object) -> list[bytes]:
    """The certificates the server sent, leaf first, DER. Python 3.11's SSLObject has no public
    get_unverified_chain (3.13 has); its C object has had it since 3.10, so it is used directly;
    without it only the leaf is known (DANE-TA then fails closed)."""
    get_chain = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if get_chain is not None:
        chain = get_chain() or []
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def check_peer(policy: TlsPolicy, ssl_object, hostname: str, nexthop: str,
               digest: str = "sha256", trust: TrustStore | None = None) -> PeerCheck:
    """The established session against ``policy``, with Postfix's trust word: "Verified"
    (TLSA, fingerprint, or CA chain and name match), "Trusted" (the chain leads to a CA of
    ``trust``, the name was not asked for or does not match), "Untrusted" (a certificate
    without any of these), "Anonymous" (none). The chain is checked against ``trust`` only
    where it decides something: verify/secure, and may/encrypt when a CA is configured."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        if policy.mandatory and policy.level != "encrypt":
            return PeerCheck("Anonymous", "Server certificate not verified",
                             result="validation-failure")
        return PeerCheck("Anonymous")
    if policy.level == "dane":
        why = dane.verify_chain(policy.tlsa, peer_chain(ssl_object),
                                wanted_names(TlsPolicy("dane", ("hostname", "nexthop")),
                                             hostname, nexthop))
        if why is None:
            return PeerCheck("Verified")
        return PeerCheck("Untrusted", "Server certificate not verified", f"TLSA mismatch: {why}",
                         "tlsa-invalid")
    if policy.level == "fingerprint":
        if hashlib.new(digest, der).hexdigest() in policy.match:
            return PeerCheck("Verified")
        return PeerCheck("Untrusted", "Server certificate not verified",
                         result="validation-failure")
    if policy.level in VERIFYING:
        why = trust.verify(peer_chain(ssl_object)) if trust is not None else "no trusted CA"
        if why is not None:
            expired = why.startswith("num=10:")  # X509_V_ERR_CERT_HAS_EXPIRED
            return PeerCheck("Untrusted", "Server certificate not trusted",
                             f"server certificate verification failed: {why}",
                             "certificate-expired" if expired else "certificate-not-trusted")
        wanted = wanted_names(policy, hostname, nexthop)
        if any(name_matches(n, w) for n in dane.leaf_names(der) for w in wanted):
            return PeerCheck("Verified")
        return PeerCheck("Trusted", "Server certificate not verified",
                         result="certificate-host-mismatch")
    if trust is not None and not trust.empty and trust.verify(peer_chain(ssl_object)) is None:
        return PeerCheck("Trusted")
    return PeerCheck("Untrusted")
