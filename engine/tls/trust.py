"""The CA trust of outbound TLS: which CAs the SMTP client trusts, and whether the chain a
server sent leads to one of them.

Postfix's rules (postconf(5)): the trusted CAs are those of ``smtp_tls_CAfile`` and
``smtp_tls_CApath``; the system's default CAs are added only with ``tls_append_default_CA =
yes`` (default no: a third-party CA is not trusted unless asked for). With no CA at all,
nothing is trusted: "may" and "encrypt" then log "Untrusted", "verify" and "secure" defer.
MTA-STS (RFC 8461 §4.2) wants the Web PKI: for it the system's CAs stand in when no CA is
configured (``webpki``).

The handshake itself never checks the chain (the client context is CERT_NONE, so that "may"
and "encrypt" still deliver to a server whose chain is not trusted, as Postfix does); the
chain is checked here afterwards with OpenSSL's X509_verify_cert (pyOpenSSL), against the
same store an OpenSSL client would use, for the TLS server purpose. Only done when the level
needs it or a CA is configured: the default "may" with no CA costs nothing. Trusts the
validated Config; the chain comes from the peer and is only parsed by OpenSSL.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from OpenSSL import crypto
from OpenSSL._util import lib as _lib

from engine.delivery import TransientFailure

_X509_PURPOSE_SSL_SERVER = 2  # OpenSSL's X509_PURPOSE_SSL_SERVER, as its TLS client sets


class TrustStore:
    """The trusted CAs from PEM files and hashed directories (OpenSSL's CAfile/CApath)."""

    def __init__(self, cafiles: list[str], capaths: list[str]) -> None:
        self.empty = not cafiles and not capaths
        self._store = crypto.X509Store()
        for cafile in cafiles:
            self._store.load_locations(cafile)
        for capath in capaths:
            self._store.load_locations(None, capath)
        if hasattr(_lib, "X509_STORE_set_purpose"):  # pyOpenSSL has no public setter
            _lib.X509_STORE_set_purpose(self._store._store, _X509_PURPOSE_SSL_SERVER)

    def verify(self, chain: list[bytes]) -> str | None:
        """None when ``chain`` (DER, leaf first, as the server sent it) leads to a trusted CA
        (dates and signatures checked); else Postfix's reason, "num=20:unable to get local
        issuer certificate"."""
        if self.empty:
            return "num=20:unable to get local issuer certificate"
        if not chain:
            return "no certificate"
        try:
            certs = [crypto.X509.from_cryptography(x509.load_der_x509_certificate(der))
                     for der in chain]
        except ValueError:  # what OpenSSL took in the handshake, the stricter parser refuses
            return "num=0:certificate in chain does not parse"
        context = crypto.X509StoreContext(self._store, certs[0], certs[1:])
        try:
            context.verify_certificate()
        except crypto.X509StoreContextError as exc:
            return f"num={exc.errors[0]}:{exc.errors[2]}"
        return None


_STORES: dict[tuple, TrustStore] = {}


def trust_store(config, *, webpki: bool = False) -> TrustStore:
    """The (cached) store for ``config`` (see the module docstring). Raises TransientFailure
    (Postfix's "client TLS configuration problem") when a configured CA cannot be loaded."""
    cafile, capath = config.smtp_tls_CAfile, config.smtp_tls_CApath
    cafiles, capaths = [cafile] if cafile else [], [capath] if capath else []
    if config.tls_append_default_CA or (webpki and not cafile and not capath):
        defaults = ssl.get_default_verify_paths()  # OpenSSL's, or SSL_CERT_FILE/SSL_CERT_DIR
        cafiles += [p for p in (defaults.cafile,) if p and Path(p).is_file()]
        capaths += [p for p in (defaults.capath,) if p and Path(p).is_dir()]
    key = (tuple(cafiles), tuple(capaths))
    store = _STORES.get(key)
    if store is None:
        try:
            store = TrustStore(cafiles, capaths)
        except (crypto.Error, OSError, ValueError) as exc:
            raise TransientFailure("4.7.5", "client TLS configuration problem") from exc
        _STORES[key] = store
    return store
