"""DANE (RFC 7672) end to end: TLSA records in a zone signed at test time (ldns-signzone),
served by nsd, validated by a real unbound whose trust anchor is the zone's KSK; deliver() to a
real ``tern serve`` whose chain is leaf (mx.tern.test) + test CA."""

import hashlib

import pytest
import test_tls_client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_tls_client import assert_sent, send

from engine.delivery import TransientFailure
from engine.tls.dane import Tlsa, verify_chain

ZONE = "tern.test."
# test_tls_client's module fixtures (tern serve with the test CA's chain, its smtp-sink, CAs)
certs, other_ca, server, sink = (test_tls_client.certs, test_tls_client.other_ca,
                                 test_tls_client.server, test_tls_client.sink)


def load(path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def spki(cert) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def tlsa(name, port, usage, selector, mtype, data: bytes) -> list[str]:
    digest = {0: lambda d: d, 1: lambda d: hashlib.sha256(d).digest(),
              2: lambda d: hashlib.sha512(d).digest()}[mtype](data)
    return [f"{name}.{ZONE} 60 IN A 127.0.0.1",
            f"_{port}._tcp.{name}.{ZONE} 60 IN TLSA {usage} {selector} {mtype} {digest.hex()}"]


def dane_send(dns, port, name, level="dane", **settings):
    return send(port, dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_tls_security_level=level,
                _host=f"{name}.{ZONE}".rstrip("."), **settings)


@pytest.mark.parametrize("selector, mtype", [(1, 1), (0, 2), (1, 2), (0, 0)])
def test_dane_ee_match_is_verified(dnssec_server, server, certs, selector, mtype):
    leaf = load(certs.default_cert)[0]
    data = spki(leaf) if selector else der(leaf)
    dns = dnssec_server(tlsa("ee", server.port, 3, selector, mtype, data), zone=ZONE)
    result, log, _ = dane_send(dns, server.port, "ee")
    assert_sent(result)
    assert "Verified TLS connection established to ee.tern.test[127.0.0.1]:" in log


def test_dane_ta_match_with_the_right_name_is_verified(dnssec_server, server, certs):
    ca = load(certs.ca)[0]
    dns = dnssec_server(tlsa("mx", server.port, 2, 0, 1, der(ca)), zone=ZONE)
    result, log, _ = dane_send(dns, server.port, "mx", level="dane-only")
    assert_sent(result)
    assert "Verified TLS connection established to mx.tern.test[127.0.0.1]:" in log


def test_dane_ta_with_a_name_mismatch_defers(dnssec_server, server, certs):
    ca = load(certs.ca)[0]
    dns = dnssec_server(tlsa("other", server.port, 2, 1, 2, spki(ca)), zone=ZONE)
    result, log, _ = dane_send(dns, server.port, "other")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not verified")
    assert "TLSA mismatch for other.tern.test[127.0.0.1]:" in log
    assert "name does not match" in log


def test_tlsa_mismatch_defers_and_logs_why(dnssec_server, server, other_ca):
    wrong = load(other_ca.default_cert)[0]
    dns = dnssec_server(tlsa("ee", server.port, 3, 1, 1, spki(wrong)), zone=ZONE)
    result, log, _ = dane_send(dns, server.port, "ee")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not verified")
    assert f"Untrusted TLS connection established to ee.tern.test[127.0.0.1]:{server.port}" in log
    assert (f"TLSA mismatch for ee.tern.test[127.0.0.1]:{server.port}: no TLSA record matches"
            " the certificate chain (3 1 1 ") in log


def test_no_tlsa_dane_is_opportunistic_and_dane_only_defers(dnssec_server, server):
    dns = dnssec_server(["none.tern.test. 60 IN A 127.0.0.1"], zone=ZONE)
    result, log, _ = dane_send(dns, server.port, "none")
    assert_sent(result)
    assert "Untrusted TLS connection established to none.tern.test[127.0.0.1]:" in log
    result, _, _ = dane_send(dns, server.port, "none", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert result.text == (f"TLS is required, but there are no TLSA records for"
                           f" _{server.port}._tcp.none.tern.test.")


def test_tlsa_without_the_ad_bit_is_not_trusted(dnssec_server, server, other_ca):
    """The same signed zone, but unbound has no trust anchor for it: the answer comes without
    AD. A (wrong) TLSA record then counts as none: dane delivers opportunistically."""
    wrong = load(other_ca.default_cert)[0]
    dns = dnssec_server(tlsa("ee", server.port, 3, 1, 1, spki(wrong)), zone=ZONE, signed=False)
    result, log, _ = dane_send(dns, server.port, "ee")
    assert_sent(result)
    assert "Untrusted TLS connection established to ee.tern.test[127.0.0.1]:" in log
    result, _, _ = dane_send(dns, server.port, "ee", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert "there are no DNSSEC-validated TLSA records" in result.text


def test_verify_chain_rules(certs, other_ca):
    leaf, ca = load(certs.default_cert)
    chain = [der(leaf), der(ca)]
    ta = Tlsa(2, 0, 1, hashlib.sha256(der(ca)).digest())
    assert verify_chain((ta,), chain, ["mx.tern.test"]) is None
    assert "name does not match" in verify_chain((ta,), chain, ["mx.example.org"])
    assert "no TLSA record matches" in verify_chain((ta,), [der(leaf)], ["mx.tern.test"])
    other_leaf, other_root = load(other_ca.default_cert)
    # a TA that is in the chain but did not sign the leaf
    forged = [der(leaf), der(other_root)]
    ta_other = Tlsa(2, 0, 1, hashlib.sha256(der(other_root)).digest())
    assert verify_chain((ta_other,), forged, ["mx.tern.test"]) is not None
