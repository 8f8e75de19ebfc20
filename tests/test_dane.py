"""DANE (RFC 7672) end to end: TLSA records in a zone signed at test time (ldns-signzone),
served by nsd, validated by a real unbound whose trust anchor is the zone's KSK; deliver() to a
real ``tern serve`` whose chain is leaf (mx.tern.test) + test CA."""

import asyncio
import hashlib
import subprocess

import pytest
import test_tls_client
import tls_certs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_tls_client import assert_sent, send
from test_tls_end_to_end import message_with

from engine.config import Config
from engine.delivery import TransientFailure
from engine.dns import Resolver
from engine.tls.dane import Tlsa, verify_chain
from engine.tls.tlsrpt_store import ResultStore, today
from engine.tls.trust import TrustStore

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
    assert (result.dsn, result.text) == ("4.7.5", "no TLSA records found")


def test_unusable_tlsa_makes_dane_encrypt_and_dane_only_defer(dnssec_server, server, sink, certs):
    """PKIX-EE(1) records are not used for SMTP (RFC 7672 §3.1.3): TLS without
    authentication, so a server without STARTTLS (the smtp-sink) is not good enough."""
    leaf = load(certs.default_cert)[0]
    dns = dnssec_server([*tlsa("pkix", server.port, 1, 1, 1, spki(leaf)),
                         *tlsa("nostarttls", sink.port, 1, 1, 1, spki(leaf))], zone=ZONE)
    result, log, _ = dane_send(dns, server.port, "pkix")
    assert_sent(result)
    assert "Untrusted TLS connection established to pkix.tern.test[127.0.0.1]:" in log
    result, _, _ = dane_send(dns, sink.port, "nostarttls")
    assert isinstance(result, TransientFailure) and result.dsn == "4.7.4"
    assert result.text.startswith("TLS is required, but was not offered")
    result, _, _ = dane_send(dns, server.port, "pkix", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "TLSA records unusable")


def test_tlsa_without_the_ad_bit_is_not_trusted(dnssec_server, server, other_ca):
    """The same signed zone, but unbound has no trust anchor for it: no answer has AD. A
    (wrong) TLSA record then counts as none: dane delivers opportunistically, dane-only
    defers as Postfix does for a host whose addresses are not DNSSEC-validated."""
    wrong = load(other_ca.default_cert)[0]
    dns = dnssec_server(tlsa("ee", server.port, 3, 1, 1, spki(wrong)), zone=ZONE, signed=False)
    result, log, _ = dane_send(dns, server.port, "ee")
    assert_sent(result)
    assert "Untrusted TLS connection established to ee.tern.test[127.0.0.1]:" in log
    result, _, _ = dane_send(dns, server.port, "ee", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "non DNSSEC destination")


# ---- RFC 7672 §2.2: DANE only behind a validated MX RRset and validated addresses ----------


def mx_send(dns, port, domain, level="dane"):
    return send(port, dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_tls_security_level=level,
                _host=f"{domain}.{ZONE}".rstrip("."), _mx=True)


@pytest.fixture
def delegated(dnssec_server, server, other_ca):
    """tern.test (signed) with ee.tern.test whose TLSA record does not match the server, the
    MX of "secure" (in the signed zone) and of "plain" (an unsigned zone delegated from it);
    "mixed" (signed) has the MX host mx.plain.tern.test, whose address is insecure."""
    wrong = spki(load(other_ca.default_cert)[0])
    return dnssec_server(
        [*tlsa("ee", server.port, 3, 1, 1, wrong),
         f"secure.{ZONE} 60 IN MX 10 ee.{ZONE}",
         f"mixed.{ZONE} 60 IN MX 10 ee.{ZONE}", f"mixed.{ZONE} 60 IN MX 20 mx.plain.{ZONE}",
         f"onlyplain.{ZONE} 60 IN MX 10 mx.plain.{ZONE}"],
        zone=ZONE,
        insecure={f"plain.{ZONE}": [
            f"plain.{ZONE} 60 IN MX 10 ee.{ZONE}", f"mx.plain.{ZONE} 60 IN A 127.0.0.1",
            f"_{server.port}._tcp.mx.plain.{ZONE} 60 IN TLSA 3 1 1 {'00' * 32}"]})


def test_secure_mx_uses_the_tlsa_records(delegated, server):
    result, log, _ = mx_send(delegated, server.port, "secure")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not verified")
    assert f"TLSA mismatch for ee.tern.test[127.0.0.1]:{server.port}:" in log


def test_insecure_mx_makes_dane_opportunistic(delegated, server, sink):
    """The MX RRset of plain.tern.test is not validated: no TLSA lookup for its MX host
    (whose records would not match), delivery at "may"."""
    result, log, marker = mx_send(delegated, server.port, "plain")
    assert_sent(result)
    assert f"Untrusted TLS connection established to ee.tern.test[127.0.0.1]:{server.port}" in log
    assert "TLSA mismatch" not in log
    assert b"with ESMTPS id" in message_with(sink, marker)


def test_insecure_mx_with_dane_only_defers(delegated, server):
    result, log, _ = mx_send(delegated, server.port, "plain", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "non DNSSEC destination")
    assert "TLS connection established" not in log  # no connection at all


def test_insecure_host_address_makes_only_that_host_opportunistic(delegated, server):
    """mixed.tern.test's MX RRset is secure: its first host keeps DANE (and fails the TLSA
    match), its second one has insecure addresses and gets "may"."""
    result, log, _ = mx_send(delegated, server.port, "mixed")
    assert_sent(result)
    assert f"TLSA mismatch for ee.tern.test[127.0.0.1]:{server.port}:" in log
    assert (f"Untrusted TLS connection established to mx.plain.tern.test[127.0.0.1]:"
            f"{server.port}") in log
    result, _, _ = mx_send(delegated, server.port, "onlyplain", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "non DNSSEC destination")


def test_bogus_tlsa_answer_defers_even_at_dane(dnssec_server, server, certs):
    """The TLSA records live in a child zone whose signatures expired: the validating
    resolver answers SERVFAIL. The records might exist, so Postfix defers ("TLSA lookup
    error") rather than deliver without them."""
    leaf = load(certs.default_cert)[0]
    good = hashlib.sha256(spki(leaf)).hexdigest()
    dns = dnssec_server([f"bad.{ZONE} 60 IN A 127.0.0.1"], zone=ZONE,
                        bogus={f"_tcp.bad.{ZONE}": [
                            f"_{server.port}._tcp.bad.{ZONE} 60 IN TLSA 3 1 1 {good}"]})
    result, log, _ = dane_send(dns, server.port, "bad")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", f"TLSA lookup error for bad.tern.test:"
                                                  f"{server.port}")
    assert "TLS connection established" not in log


def test_resolver_reports_validation_only_when_asked(delegated):
    """The DNS layer: AD only on DNSSEC-asking lookups, and never for the unsigned zone; the
    ordinary lookups never ask (no DO/AD) and so report nothing secure."""
    config = Config(dns_servers=(f"{delegated[0]}:{delegated[1]}",), dns_timeout=2.0)

    async def lookups():
        resolver = Resolver(config)
        plain = [await resolver.mx_lookup("secure.tern.test"),
                 await resolver.address_lookup("ee.tern.test")]
        assert resolver._dnssec is None  # the ordinary path never made the DNSSEC resolver
        asked = [await resolver.mx_lookup(name, dnssec=True)
                 for name in ("secure.tern.test", "plain.tern.test", "ns.tern.test")]
        hosts = [await resolver.address_lookup(name, dnssec=True)
                 for name in ("ee.tern.test", "mx.plain.tern.test")]
        return plain, asked, hosts

    plain, asked, hosts = asyncio.run(lookups())
    assert [(r.items, r.secure) for r in plain] == [(["ee.tern.test"], False),
                                                    (["127.0.0.1"], False)]
    assert [(r.items, r.secure) for r in asked] == [
        (["ee.tern.test"], True), (["ee.tern.test"], False),
        (["ns.tern.test"], True)]  # implicit MX: the validated "no MX" answer
    assert [(r.items, r.secure) for r in hosts] == [(["127.0.0.1"], True),
                                                    (["127.0.0.1"], False)]


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


@pytest.fixture(scope="module")
def intermediate_chain(tmp_path_factory):
    """root → intermediate CA → leaf mx.tern.test; ``files`` holds the leaf and the intermediate
    only (a server that does not send its root, as most do)."""
    directory = tmp_path_factory.mktemp("intermediate")
    root_key, inter_key, leaf_key = tls_certs._key(), tls_certs._key(), tls_certs._key()
    root = tls_certs._certificate("Tern Root", root_key, "Tern Root", root_key, ca=True)
    inter = tls_certs._certificate("Tern Intermediate", inter_key, "Tern Root", root_key, ca=True)
    leaf = tls_certs._certificate("mx.tern.test", leaf_key, "Tern Intermediate", inter_key,
                                  sans=("mx.tern.test",))
    cert, key = directory / "chain.pem", directory / "leaf.key"
    cert.write_bytes(tls_certs._pem_cert(leaf) + tls_certs._pem_cert(inter))
    key.write_bytes(tls_certs._pem_key(leaf_key))
    return root, inter, leaf, cert, key


@pytest.mark.parametrize("selector, mtype", [(0, 1), (1, 2)])
def test_dane_ta_may_be_an_intermediate_ca(intermediate_chain, selector, mtype):
    """RFC 7671 §5.2.2: a DANE-TA record may name an intermediate CA; the chain then ends there
    (not at a self-signed root), whether or not the server also sends the root."""
    root, inter, leaf, _, _ = intermediate_chain
    data = der(inter) if selector == 0 else spki(inter)
    digest = {1: hashlib.sha256, 2: hashlib.sha512}[mtype](data).digest()
    record = Tlsa(2, selector, mtype, digest)
    for chain in ([der(leaf), der(inter)], [der(leaf), der(inter), der(root)]):
        assert verify_chain((record,), chain, ["mx.tern.test"]) is None
        assert "name does not match" in verify_chain((record,), chain, ["mx.example.org"])


def test_dane_ta_full_record_of_a_root_the_server_left_out(intermediate_chain):
    """RFC 7671 §5.2.2: a "2 0 0" record carries the whole TA certificate, so the server need not
    send it; a digest record for a TA that is not in the chain still matches nothing."""
    root, inter, leaf, _, _ = intermediate_chain
    chain = [der(leaf), der(inter)]
    assert verify_chain((Tlsa(2, 0, 0, der(root)),), chain, ["mx.tern.test"]) is None
    digest = Tlsa(2, 0, 1, hashlib.sha256(der(root)).digest())
    assert "no TLSA record matches" in verify_chain((digest,), chain, ["mx.tern.test"])
    garbage = Tlsa(2, 0, 0, b"not a certificate")
    assert "no TLSA record matches" in verify_chain((garbage,), chain, ["mx.tern.test"])


@pytest.fixture(scope="module")
def intermediate_server(tmp_path_factory, certs, sink, intermediate_chain):
    *_, cert, key = intermediate_chain
    server = test_tls_client.start_tls_server(
        tmp_path_factory.mktemp("tern-inter"), certs, sink, smtpd_tls_cert_file=str(cert),
        smtpd_tls_key_file=str(key))
    yield server
    server.stop()


def test_dane_ta_on_the_intermediate_end_to_end(dnssec_server, intermediate_server,
                                                intermediate_chain):
    _, inter, _, _, _ = intermediate_chain
    port = intermediate_server.port
    dns = dnssec_server(tlsa("mx", port, 2, 1, 2, spki(inter)), zone=ZONE)
    result, log, _ = dane_send(dns, port, "mx", level="dane-only")
    assert_sent(result)
    assert "Verified TLS connection established to mx.tern.test[127.0.0.1]:" in log


def openssl(*args, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def odd_keys(tmp_path_factory):
    """Self-signed certificates (DER) whose keys ``cryptography`` cannot load or re-encodes:
    SM2 (a curve it does not support) and RSA-PSS (its SPKI names id-RSASSA-PSS), each with
    the SPKI as OpenSSL (and so ldns-dane, hash-slinger…) gives it."""
    directory = tmp_path_factory.mktemp("odd")
    out = {}
    for name, keygen in (("sm2", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:SM2"]),
                         ("pss", ["-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048"])):
        key = directory / f"{name}.key"
        try:
            openssl("genpkey", *keygen, "-out", str(key))
        except subprocess.CalledProcessError:
            pytest.skip(f"this openssl cannot make {name} keys")
        cert = openssl("req", "-new", "-x509", "-key", str(key), "-subj", f"/CN={name}.tern.test",
                       "-days", "30", "-outform", "DER")
        spki_bytes = openssl("pkey", "-in", str(key), "-pubout", "-outform", "DER")
        out[name] = (cert, spki_bytes)
    return out


def test_spki_selector_digests_the_key_as_the_certificate_encodes_it(odd_keys):
    for name, (cert, key) in odd_keys.items():
        record = Tlsa(3, 1, 1, hashlib.sha256(key).digest())
        assert verify_chain((record,), [cert], [f"{name}.tern.test"]) is None, name


def test_certificates_that_do_not_parse_match_nothing_and_raise_nothing(certs, odd_keys):
    """A chain certificate with a key no library here can use (SM2), or whose DER is broken,
    is a TLSA mismatch like any other (never an exception out of the delivery agent)."""
    leaf, ca = load(certs.default_cert)
    sm2, _ = odd_keys["sm2"]
    other = Tlsa(2, 1, 1, b"\x01" * 32)
    broken = der(ca)[:40]
    for chain in ([der(leaf), sm2, der(ca)], [der(leaf), broken], [broken]):
        assert "no TLSA record matches" in verify_chain((other,), chain, ["mx.tern.test"])
    ta = Tlsa(2, 1, 1, hashlib.sha256(spki(ca)).digest())
    assert verify_chain((ta,), [der(leaf), sm2, der(ca)], ["mx.tern.test"]) is None
    store = TrustStore([str(certs.ca)], [])
    assert store.verify([der(leaf), der(ca)]) is None
    assert store.verify([der(leaf), broken]) == "num=0:certificate in chain does not parse"


@pytest.fixture(scope="module")
def sm2_chain_server(tmp_path_factory, certs, sink, odd_keys):
    """tern serve whose chain is its leaf, an SM2 certificate, then the CA."""
    directory = tmp_path_factory.mktemp("sm2-chain")
    leaf, ca = load(certs.default_cert)
    sm2 = x509.load_der_x509_certificate(odd_keys["sm2"][0])
    chain = directory / "chain.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                               for c in (leaf, sm2, ca)))
    server = test_tls_client.start_tls_server(directory, certs, sink,
                                              smtpd_tls_cert_file=str(chain))
    yield server
    server.stop()


def test_odd_chain_certificate_end_to_end(dnssec_server, sm2_chain_server, certs, other_ca):
    port = sm2_chain_server.port
    ca = load(certs.ca)[0]
    dns = dnssec_server([*tlsa("mx", port, 2, 1, 1, spki(ca)),
                         *tlsa("wrong", port, 2, 1, 1, spki(load(other_ca.ca)[0]))], zone=ZONE)
    result, log, _ = dane_send(dns, port, "mx", level="dane-only")
    assert_sent(result)
    assert "Verified TLS connection established to mx.tern.test[127.0.0.1]:" in log
    result, log, _ = dane_send(dns, port, "wrong", level="dane-only")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not verified")


# ---- TLS-RPT (RFC 8460 §4.3.2.1): what DANE deliveries record ---------------------------------


def test_tlsrpt_records_dane_results(dnssec_server, server, certs, other_ca, tmp_path):
    leaf = load(certs.default_cert)[0]
    wrong = load(other_ca.default_cert)[0]
    good = hashlib.sha256(spki(leaf)).hexdigest()
    dns = dnssec_server([*tlsa("ee", server.port, 3, 1, 1, spki(leaf)),
                         *tlsa("wrong", server.port, 3, 1, 1, spki(wrong)),
                         "none.tern.test. 60 IN A 127.0.0.1",
                         f"bad.{ZONE} 60 IN A 127.0.0.1"], zone=ZONE,
                        bogus={f"_tcp.bad.{ZONE}": [
                            f"_{server.port}._tcp.bad.{ZONE} 60 IN TLSA 3 1 1 {good}"]})
    cases = [("ee", "dane", "success"), ("wrong", "dane", "tlsa-invalid"),
             ("bad", "dane", "dnssec-invalid"), ("none", "dane-only", "dane-required")]
    for name, level, _ in cases:
        dane_send(dns, server.port, name, level=level, smtp_tlsrpt_enable=True,
                  queue_directory=tmp_path / name)
    found = {name: ResultStore(tmp_path / name).read(today()) for name, _, _ in cases}
    assert {name: [r.result for r in results] for name, results in found.items()} == {
        name: [kind] for name, _, kind in cases}
    (success,) = found["ee"]
    assert (success.policy_domain, success.policy_type) == ("ee.tern.test", "tlsa")
    assert success.policy_string == (f"3 1 1 {good}",)
    assert (success.mx_host, success.receiving_mx, success.receiving_ip, success.sending_ip) == (
        ("ee.tern.test",), "ee.tern.test", "127.0.0.1", "127.0.0.1")
    assert found["wrong"][0].reason.startswith("TLSA mismatch: no TLSA record matches")
    assert found["bad"][0].reason == f"TLSA lookup error for bad.tern.test:{server.port}"
    assert found["none"][0].reason == "no TLSA records found"
