"""Certificate and key checks at configuration load, with pyOpenSSL.

The standard library only finds a bad certificate file when a handshake fails (or reports
"[SSL] PEM lib" with no file name); this loads each chain and key the way the server will and
says which file is wrong and why, in one line. Trusts nothing in the files.
"""

import datetime
import re

from cryptography import x509
from OpenSSL import SSL


class CertificateError(ValueError):
    """A certificate chain or key that cannot be used; ``str()`` names the file."""


def check_key_pair(cert_file: str, key_file: str = "") -> list[str]:
    """Check that ``cert_file`` holds a PEM certificate chain (leaf first) and ``key_file``
    (default: the same file, as in Postfix) the matching private key. Returns warnings (an
    expired or not yet valid leaf certificate); raises CertificateError."""
    key_file = key_file or cert_file
    if b"-----BEGIN CERTIFICATE-----" not in _read(cert_file):
        raise CertificateError(f"{cert_file}: no PEM certificate found")
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", _read(key_file)):
        raise CertificateError(f"{key_file}: no PEM private key found")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        context.use_certificate_chain_file(cert_file)
    except SSL.Error as error:
        raise CertificateError(f"{cert_file}: no usable PEM certificate chain "
                               f"({_reason(error)})") from None
    try:
        context.use_privatekey_file(key_file)
        context.check_privatekey()
    except SSL.Error as error:
        reason = _reason(error)
        if "mismatch" in reason or not reason:
            where = key_file if key_file == cert_file else f"{key_file} and {cert_file}"
            raise CertificateError(f"{where}: the private key does not match the certificate"
                                   ) from None
        raise CertificateError(f"{key_file}: no usable PEM private key ({reason})") from None
    return certificate_warnings(cert_file)


def certificate_warnings(cert_file: str) -> list[str]:
    """A warning when the leaf certificate has expired or is not valid yet."""
    leaf = x509.load_pem_x509_certificates(_read(cert_file))[0]
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        return [f"{cert_file}: certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}"]
    if leaf.not_valid_before_utc > now:
        return [f"{cert_file}: certificate not valid before "
                f"{leaf.not_valid_before_utc:%Y-%m-%d}"]
    return []


def _read(file: str) -> bytes:
    try:
        with open(file, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise CertificateError(f"{file}: cannot read: {error.strerror or error}") from None


def _reason(error: SSL.Error) -> str:
    """OpenSSL's reasons ("no start line", "key values mismatch"), without its codes."""
    details = error.args[0] if error.args else []
    if not isinstance(details, list):
        return str(details)
    reasons = [item[-1] for item in details if isinstance(item, tuple) and item[-1]]
    return "; ".join(dict.fromkeys(reasons))
