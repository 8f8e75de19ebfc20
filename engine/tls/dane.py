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
name or date check (§3.1.1). DANE-TA matches a certificate the server sent in its chain (a root
or an intermediate CA), or is the certificate of a full "2 0 0" record the server left out (RFC
7671 §5.2.2); the leaf must then chain up to it (checked with pyOpenSSL's X509Store, the TA as the
only trusted certificate, partial chains allowed) and carry the TLSA base name or the next-hop
domain (§3.2.2). The peer's chain comes
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
from OpenSSL import crypto

from engine.delivery import TransientFailure
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


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element starting at ``at``: (tag, where its contents start, where it ends).
    Raises ValueError when it does not fit in ``der``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, first, at = der[at], der[at + 1], at + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 0 < count <= 4 or at + count > len(der):
            raise ValueError("bad DER length")
        length, at = int.from_bytes(der[at:at + count], "big"), at + count
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def spki_der(cert: bytes) -> bytes:
    """The certificate's SubjectPublicKeyInfo exactly as encoded in it (what TLSA selector 1
    digests), found by walking the DER (RFC 5280 §4.1: the seventh field of tbsCertificate,
    the sixth without the optional version) rather than by decoding the key: a key algorithm
    that no library here supports (SM2, GOST…) still has its bytes. Raises ValueError."""
    _, tbs, _ = _element(cert, 0)  # Certificate ::= SEQUENCE { tbsCertificate, … }
    tag, at, _ = _element(cert, tbs)
    if tag != 0x30:
        raise ValueError("no tbsCertificate")
    if _element(cert, at)[0] == 0xA0:  # [0] EXPLICIT version
        at = _element(cert, at)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        at = _element(cert, at)[2]
    tag, _, end = _element(cert, at)
    if tag != 0x30:
        raise ValueError("no subjectPublicKeyInfo")
    return cert[at:end]


def _selected(der: bytes, selector: int) -> bytes:
    return der if selector == 0 else spki_der(der)


def record_matches(record: Tlsa, der: bytes) -> bool:
    try:
        data = _selected(der, record.selector)
    except ValueError:
        return False  # not a certificate: it matches nothing
    algorithm = MATCHING[record.mtype]
    if algorithm is not None:
        data = hashlib.new(algorithm, data).digest()
    return data == record.data


def _chains_to(leaf: bytes, anchor: bytes, intermediates: list[bytes]) -> bool:
    """Whether ``leaf`` chains up to ``anchor`` through ``intermediates``. The anchor may be an
    intermediate CA (RFC 7671 §5.2.2): PARTIAL_CHAIN lets a trusted certificate that is not
    self-signed end the chain, as OpenSSL's own DANE code does."""
    store = crypto.X509Store()
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    try:
        store.add_cert(crypto.X509.from_cryptography(x509.load_der_x509_certificate(anchor)))
        chain = [crypto.X509.from_cryptography(x509.load_der_x509_certificate(der))
                 for der in intermediates]
        context = crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(x509.load_der_x509_certificate(leaf)), chain)
        context.verify_certificate()
    except (crypto.X509StoreContextError, crypto.Error, ValueError):
        return False  # no chain, or a certificate (or a "2 0 0" record) that does not parse
    return True


def leaf_names(der: bytes) -> list[str]:
    """The leaf's DNS names: subjectAltName DNS entries, else the subject's common name.
    Empty for a certificate that does not parse (it then matches no name)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        if not names:
            names = [str(a.value) for a in cert.subject if a.oid == x509.NameOID.COMMON_NAME]
    except ValueError:
        return []
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
        candidates = [(der, chain[1:index]) for index, der in enumerate(chain[1:], start=1)
                      if record_matches(record, der)]
        if not candidates and record.selector == 0 and record.mtype == 0:
            # RFC 7671 §5.2.2: a full "2 0 0" record may stand for a TA the server left out
            candidates = [(record.data, chain[1:])]
        for der, intermediates in candidates:
            if _chains_to(leaf, der, intermediates):
                anchored = True
                if any(name_matches(n, w) for n in leaf_names(leaf) for w in wanted):
                    return None
    if anchored:
        return "the certificate chains to a DANE-TA trust anchor but its name does not match"
    return f"no TLSA record matches the certificate chain ({', '.join(map(str, records))})"
