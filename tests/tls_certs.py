"""Throwaway X.509 material for the TLS tests: a CA, the server's default certificate and two
SNI certificates (key and chain in one PEM file, as tls_server_sni_maps wants them).

    certs = make_certs(tmp_path)            # TlsFiles: paths, names in each subject CN
    certs.default_cert, certs.default_key   # mx.tern.test
    certs.sni["mail.example.org"]           # key + leaf + CA in one file
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_NAME = "mx.tern.test"
SNI_NAMES = ("mail.example.org", "example.net")  # example.net also serves *.example.net


@dataclass
class TlsFiles:
    directory: Path
    ca: Path
    default_cert: Path
    default_key: Path
    expired_cert: Path
    expired_key: Path
    sni: dict[str, Path] = field(default_factory=dict)  # CN → key+chain PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False,
                 days: tuple[int, int] = (-1, 30), sans: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=days[0]))
               .not_valid_after(now + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in sans]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certs(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _certificate("Tern Test CA", ca_key, "Tern Test CA", ca_key, ca=True)
    files = TlsFiles(directory, directory / "ca.pem", directory / "default.crt",
                     directory / "default.key", directory / "expired.crt",
                     directory / "expired.key")
    files.ca.write_bytes(_pem_cert(ca))
    key = _key()
    leaf = _certificate(DEFAULT_NAME, key, "Tern Test CA", ca_key, sans=(DEFAULT_NAME,))
    files.default_cert.write_bytes(_pem_cert(leaf) + _pem_cert(ca))
    files.default_key.write_bytes(_pem_key(key))
    old = _certificate(DEFAULT_NAME, key, "Tern Test CA", ca_key, days=(-30, -1))
    files.expired_cert.write_bytes(_pem_cert(old))
    files.expired_key.write_bytes(_pem_key(key))
    for name in SNI_NAMES:
        key = _key()
        leaf = _certificate(name, key, "Tern Test CA", ca_key, sans=(name, f"*.{name}"))
        path = directory / f"sni-{name}.pem"
        path.write_bytes(_pem_key(key) + _pem_cert(leaf) + _pem_cert(ca))
        files.sni[name] = path
    return files
