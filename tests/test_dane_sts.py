"""DANE and MTA-STS together (RFC 8461 §2): at the "dane" level, a DNSSEC-signed domain whose MX
host has no TLSA records still gets its MTA-STS policy; a host with usable TLSA records is judged
by DANE alone. A validating unbound and nsd serve the signed zone tern.test, a local HTTPS
server the policy, ``tern serve`` (certificate mx.tern.test) the MX host."""

import pytest
import test_tls_client
import tls_certs
from test_dane import der, load, tlsa
from test_mtasts import PolicyServer, policy
from test_tls_client import assert_sent, send

from engine.delivery import TransientFailure
from engine.tls import sts_fetch
from engine.tls.tlsrpt_store import ResultStore, today

ZONE = "tern.test."
certs, server, sink = test_tls_client.certs, test_tls_client.server, test_tls_client.sink


@pytest.fixture(scope="module")
def sts_site(tmp_path_factory):
    """A CA of its own and the HTTPS certificate of mta-sts.tern.test: (ca path, key+chain)."""
    directory = tmp_path_factory.mktemp("sts-site")
    ca_key, key = tls_certs._key(), tls_certs._key()
    ca = tls_certs._certificate("STS CA", ca_key, "STS CA", ca_key, ca=True)
    leaf = tls_certs._certificate("mta-sts.tern.test", key, "STS CA", ca_key,
                                  sans=("mta-sts.tern.test",))
    (directory / "ca.pem").write_bytes(tls_certs._pem_cert(ca))
    (directory / "site.pem").write_bytes(tls_certs._pem_key(key) + tls_certs._pem_cert(leaf))
    return directory / "ca.pem", directory / "site.pem"


@pytest.fixture
def https(sts_site):
    servers = []

    def start(body: bytes) -> PolicyServer:
        servers.append(PolicyServer(sts_site[1], body))
        return servers[-1]

    yield start
    for one in servers:
        one.close()
    sts_fetch.CACHE.clear()


def signed_zone(port, *extra):
    return [f'_mta-sts.{ZONE} 60 IN TXT "v=STSv1; id=20261121;"',
            f"mta-sts.{ZONE} 60 IN A 127.0.0.1",
            f"{ZONE} 60 IN MX 10 mx.{ZONE}",
            f"mx.{ZONE} 60 IN A 127.0.0.1", *extra]


def dane_send(dns, server, sts_site, https_port, **settings):
    return send(server.port, dns_servers=[f"{dns[0]}:{dns[1]}"],
                smtp_tls_security_level="dane", smtp_mta_sts_enable=True,
                smtp_mta_sts_CAfile=str(sts_site[0]), smtp_mta_sts_https_port=https_port,
                _host="tern.test", _mx=True, **settings)


def test_signed_domain_without_tlsa_gets_its_sts_enforce_policy(dnssec_server, server,
                                                                 sts_site, https):
    """Without MTA-STS this delivery would be opportunistic ("dane" without TLSA is "may"):
    the enforce policy, whose mx list leaves the host out, must refuse it."""
    dns = dnssec_server(signed_zone(server.port), zone=ZONE)
    site = https(policy("enforce", mx="mx.example.org"))
    result, _, _ = dane_send(dns, server, sts_site, site.port)
    assert isinstance(result, TransientFailure), result
    assert (result.dsn, result.text) == (
        "4.7.5", "MX host mx.tern.test does not match the MTA-STS policy of tern.test")
    assert site.requests == 1


def test_signed_domain_without_tlsa_is_verified_as_sts_wants(dnssec_server, server, certs, sts_site,
                                                             https):
    dns = dnssec_server(signed_zone(server.port), zone=ZONE)
    site = https(policy("enforce"))
    result, log, _ = dane_send(dns, server, sts_site, site.port, smtp_tls_CAfile=str(certs.ca))
    assert_sent(result)
    assert f"Verified TLS connection established to mx.tern.test[127.0.0.1]:{server.port}" \
        in log
    # the same without the CA that signed mx.tern.test: STS enforce wants a trusted chain
    result, _, _ = dane_send(dns, server, sts_site, site.port)
    assert isinstance(result, TransientFailure)
    assert result.text == "Server certificate not trusted"


def test_a_host_with_usable_tlsa_records_is_judged_by_dane_alone(dnssec_server, server, certs,
                                                                 sts_site, https, tmp_path):
    """DANE first (RFC 8461 §2): the TLSA record authenticates the host, so the MTA-STS mx list
    (which leaves it out) does not apply to it."""
    ca = load(certs.ca)[0]
    dns = dnssec_server(signed_zone(server.port, tlsa("mx", server.port, 2, 0, 1, der(ca))[1]),
                        zone=ZONE)
    site = https(policy("enforce", mx="mx.example.org"))
    result, log, _ = dane_send(dns, server, sts_site, site.port, smtp_tlsrpt_enable=True,
                               queue_directory=tmp_path)
    assert_sent(result)
    assert f"Verified TLS connection established to mx.tern.test[127.0.0.1]:{server.port}" \
        in log
    (session,) = ResultStore(tmp_path).read(today())  # TLS-RPT names the policy that applied
    assert (session.policy_type, session.result, session.mx_host) == (
        "tlsa", "success", ("mx.tern.test",))
