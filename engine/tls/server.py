"""The SMTP server's ``ssl.SSLContext``: protocols, ciphers, certificates and SNI, from Config.

Built once per worker at start (after engine.config.loader has checked the files with pyOpenSSL)
and handed to every listener's sessions; the loop's ``start_tls`` does the rest. Trusts the
validated Config; the SNI name comes from the client and is only used as a lookup key.
"""

import ssl

from engine.config import Config
from engine.tls.certs import certificate_warnings
from engine.tls.protocols import MODERN_CIPHERS, parse_protocols

__all__ = ["MODERN_CIPHERS", "describe", "server_context", "validity_warnings"]

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def base_context(config: Config) -> ssl.SSLContext:
    """A server context with the configured protocols and ciphers and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lowest, highest = parse_protocols(config.smtpd_tls_protocols)
    context.minimum_version = _VERSIONS[lowest]
    context.maximum_version = _VERSIONS[highest]
    context.set_ciphers(config.tls_high_cipherlist)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def server_context(config: Config) -> ssl.SSLContext | None:
    """The context every TLS listener uses (None without ``smtpd_tls_cert_file``), choosing
    the certificate by SNI from ``tls_server_sni_maps`` when the client names a listed domain."""
    if not config.smtpd_tls_cert_file:
        return None
    default = base_context(config)
    default.load_cert_chain(config.smtpd_tls_cert_file, config.smtpd_tls_key_file or None)
    by_name: dict[str, ssl.SSLContext] = {}
    for domain, pem in config.tls_server_sni_maps.items():
        context = base_context(config)
        context.load_cert_chain(pem)  # the key and the chain in one file, as Postfix's
        by_name[domain] = context
    if by_name:
        default.sni_callback = SniChooser(by_name)
    return default


def validity_warnings(config: Config) -> list[str]:
    """Expired (or not yet valid) certificates among the configured ones, for the log: an
    MTA's opportunistic TLS still works with them, but the administrator should know."""
    files = [config.smtpd_tls_cert_file, *config.tls_server_sni_maps.values()]
    return [warning for file in dict.fromkeys(files) if file
            for warning in certificate_warnings(file)]


def sni_lookup_keys(name: str) -> list[str]:
    """Postfix's tls_server_sni_maps keys for an SNI name: the name itself, then each ancestor
    domain with a leading dot (mail.example.com → .example.com → .com)."""
    labels = name.lower().rstrip(".").split(".")
    return [".".join(labels)] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


class SniChooser:
    """The ``sni_callback``: switches the connection to the context of the SNI name's entry.
    A name with no entry keeps the default certificate (as Postfix's "not matched, using
    default chain")."""

    def __init__(self, by_name: dict[str, ssl.SSLContext]) -> None:
        self.by_name = by_name

    def __call__(self, connection: ssl.SSLObject, name: str | None,
                 context: ssl.SSLContext) -> None:
        if not name:
            return
        for key in sni_lookup_keys(name):
            chosen = self.by_name.get(key)
            if chosen is not None:
                connection.context = chosen
                return


def describe(ssl_object: ssl.SSLObject) -> str:
    """Postfix's words for a session: ``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256
    bits)`` (OpenSSL gives the secret bits once; Postfix prints used/algorithm bits)."""
    name, _, bits = ssl_object.cipher()
    return f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
