"""DANE for SMTP (RFC 7672): TLSA records trusted only when DNSSEC-validated, and the match of
the server's certificate chain against them.

The TLSA lookup goes to the configured resolvers with the DO bit and the AD bit set (RFC 6840
§5.7): a validating resolver (unbound) answers with AD only when it validated the answer, and an
answer without AD counts as no TLSA at all (RFC 7672 §2.2: insecure records are not used), so
Tern trusts the resolver on the wire and nothing else: the resolver must be local or reached over
a trusted path, as with Postfix.

Usable records are DANE-TA(2) and DANE-EE(3) with selector 0 (the full certificate) or 1 (the
SubjectPublicKeyInfo), matching type 0 (exact), 1 (SHA-256) or 2 (SHA-512); PKIX-TA(0) and
PKIX-EE(1) are not used for SMTP (RFC 7672 §3.1.3). DANE-EE matches the leaf alone, without a
name or date check (§3.1.1). DANE-TA matches a certificate the server sent in its chain; the leaf
must then chain up to it (checked with pyOpenSSL's X509Store, the TA as the only trusted
certificate) and carry the TLSA base name or the next-hop domain (§3.2.2). The peer's chain comes
from the TLS object (see engine.tls's docstring for how with Python 3.11).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from engine.delivery import TransientFailure
from engine.dns import make_resolver
from engine.tls.policy import name_matches

USAGES = {2: "DANE-TA", 3: "DANE-EE"}
SELECTORS = {0: "Cert", 1: "SPKI"}
MATCHING = {0: None, 1: "sha256", 2: "sha512"}


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in USAGES and self.selector in SELECTORS and self.mtype in MATCHING

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}…"


@dataclass(frozen=True)
class TlsaAnswer:
    """The TLSA RRset of ``name``: ``secure`` when the resolver set AD; ``records`` only the
    usable ones; ``found`` how many there were in all."""

    name: str
    secure: bool
    records: tuple[Tlsa, ...]
    found: int


def dnssec_resolver(config) -> dns.asyncresolver.Resolver:
    """A resolver for the configured servers that asks for DNSSEC (DO, and AD in the query),
    so that the validating resolver reports what it validated."""
    return make_resolver(config, dnssec=True)


async def lookup_tlsa(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> TlsaAnswer:
    """``_PORT._tcp.HOST`` TLSA. No records (NXDOMAIN, no data) is an empty answer; SERVFAIL or
    a timeout raises TransientFailure (Postfix defers: the records may exist)."""
    name = f"_{port}._tcp.{host.rstrip('.')}."
    try:
        answer = await resolver.resolve(name, "TLSA", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return TlsaAnswer(name, False, (), 0)
    except (dns.exception.DNSException, OSError):
        raise TransientFailure("4.7.5", f"TLSA lookup error for {host}:{port}") from None
    secure = bool(answer.response.flags & dns.flags.AD)
    records = [Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer]
    return TlsaAnswer(name, secure, tuple(r for r in records if r.usable), len(records))


def _selected(der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def record_matches(record: Tlsa, der: bytes) -> bool:
    data = _selected(der, record.selector)
    algorithm = MATCHING[record.mtype]
    if algorithm is not None:
        data = hashlib.new(algorithm, data).digest()
    return data == record.data


def _chains_to(leaf: bytes, anchor: bytes, intermediates: list[bytes]) -> bool:
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(x509.load_der_x509_certificate(anchor)))
    chain = [crypto.X509.from_cryptography(x509.load_der_x509_certificate(der))
             for der in intermediates]
    context = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(x509.load_der_x509_certificate(leaf)), chain)
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def leaf_names(der: bytes) -> list[str]:
    """The leaf's DNS names: subjectAltName DNS entries, else the subject's common name."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject if a.oid == x509.NameOID.COMMON_NAME]
    return [name.lower() for name in names]


def verify_chain(records: tuple[Tlsa, ...], chain: list[bytes],
                 wanted: list[str]) -> str | None:
    """None when the chain (leaf first, DER) satisfies one of ``records``; else why not."""
    if not chain:
        return "the server sent no certificate"
    leaf = chain[0]
    for record in records:
        if record.usage == 3 and record_matches(record, leaf):
            return None
    anchored = False
    for record in records:
        if record.usage != 2:
            continue
        for index, der in enumerate(chain[1:], start=1):
            if record_matches(record, der) and _chains_to(leaf, der, chain[1:index]):
                anchored = True
                if any(name_matches(n, w) for n in leaf_names(leaf) for w in wanted):
                    return None
    if anchored:
        return "the certificate chains to a DANE-TA trust anchor but its name does not match"
    return f"no TLSA record matches the certificate chain ({', '.join(map(str, records))})"
