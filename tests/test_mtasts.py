"""MTA-STS end to end: unbound on loopback (MX, _mta-sts TXT, mta-sts host), a local HTTPS
server (the standard library's, with a *.example.net certificate of the test CA) serving the
policy, and deliver() to a real ``tern serve`` (certificate mx.tern.test) by MX."""

import http.server
import ssl
import threading

import pytest
import test_tls_client
from peers import free_port
from test_tls_client import assert_sent, send

from engine.delivery import TransientFailure
from engine.tls import sts_fetch
from engine.tls.tlsrpt_store import ResultStore, today

certs, server, sink = test_tls_client.certs, test_tls_client.server, test_tls_client.sink


class PolicyServer:
    """HTTPS on 127.0.0.1: serves ``policy`` at /.well-known/mta-sts.txt, counts requests."""

    def __init__(self, pem, policy: bytes):
        self.policy, self.requests = policy, 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                owner.requests += 1
                found = self.path == "/.well-known/mta-sts.txt"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(owner.policy)))
                self.end_headers()
                self.wfile.write(owner.policy)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def policy_server(certs):
    servers = []

    def start(policy: bytes) -> PolicyServer:
        servers.append(PolicyServer(certs.sni["example.net"], policy))
        return servers[-1]

    yield start
    for one in servers:
        one.close()
    sts_fetch.CACHE._entries.clear()


def policy(mode, mx="mx.tern.test"):
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n".encode()


RECORDS = ['_mta-sts.example.net. 60 IN TXT "v=STSv1; id=20261121;"',
           "mta-sts.example.net. 60 IN A 127.0.0.1",
           "example.net. 60 IN MX 10 mx.tern.test.",
           "mx.tern.test. 60 IN A 127.0.0.1"]


def test_enforce_verifies_the_mx_certificate_and_caches_the_policy(dns_server, server,
                                                                      policy_server, certs):
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce"))
    for _ in range(2):
        result, log, _ = send(server.port, dns_servers=[f"{dns[0]}:{dns[1]}"],
                              smtp_mta_sts_enable=True, smtp_mta_sts_CAfile=str(certs.ca),
                              smtp_mta_sts_https_port=https.port, smtp_tls_CAfile=str(certs.ca),
                              _host="example.net", _mx=True)
        assert_sent(result)
        assert f"Verified TLS connection established to mx.tern.test[127.0.0.1]:{server.port}" \
            in log
    assert https.requests == 1  # the second delivery used the cached policy (same id)


def test_enforce_with_an_untrusted_mx_certificate_defers(dns_server, server, policy_server,
                                                         certs):
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce"))
    result, _, _ = send(server.port, dns_servers=[f"{dns[0]}:{dns[1]}"],
                        smtp_mta_sts_enable=True, smtp_mta_sts_CAfile=str(certs.ca),
                        smtp_mta_sts_https_port=https.port, _host="example.net", _mx=True)
    assert isinstance(result, TransientFailure)  # system roots do not know the test CA
    assert result.text == "Server certificate not trusted"


def test_enforce_with_a_non_matching_mx_defers_and_testing_delivers(dns_server, server,
                                                                    policy_server, certs):
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce", mx="*.example.org"))
    settings = dict(dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_mta_sts_enable=True,
                    smtp_mta_sts_CAfile=str(certs.ca), smtp_mta_sts_https_port=https.port,
                    _host="example.net", _mx=True)
    result, _, _ = send(server.port, **settings)
    assert isinstance(result, TransientFailure)
    assert result.text == "MX host mx.tern.test does not match the MTA-STS policy of example.net"
    sts_fetch.CACHE._entries.clear()
    https.policy = policy("testing", mx="*.example.org")
    result, log, _ = send(server.port, **settings)
    assert_sent(result)
    assert "MTA-STS testing: MX host mx.tern.test does not match" in log


def test_policy_behind_an_untrusted_https_certificate_is_ignored(dns_server, server,
                                                                 policy_server):
    """The policy host's certificate is checked: with the system roots only, the test CA's
    certificate fails, so there is no policy and the mail goes out as without MTA-STS."""
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce", mx="*.example.org"))
    result, log, _ = send(server.port, dns_servers=[f"{dns[0]}:{dns[1]}"],
                          smtp_mta_sts_enable=True, smtp_mta_sts_https_port=https.port,
                          _host="example.net", _mx=True)
    assert_sent(result)
    assert "TLS connection established" not in log  # no policy: smtp_tls_security_level none


# ---- TLS-RPT (RFC 8460): what each delivery records under the MTA-STS policy -----------------


def recorded(directory):
    return ResultStore(directory).read(today())


def test_tlsrpt_records_sts_sessions_and_fetch_failures(dns_server, server, policy_server,
                                                        certs, tmp_path):
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce"))
    settings = dict(dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_mta_sts_enable=True,
                    smtp_mta_sts_https_port=https.port, _host="example.net", _mx=True,
                    smtp_tlsrpt_enable=True)
    result, _, _ = send(server.port, smtp_mta_sts_CAfile=str(certs.ca),
                        smtp_tls_CAfile=str(certs.ca), queue_directory=tmp_path / "ok",
                        **settings)
    assert_sent(result)
    (success,) = recorded(tmp_path / "ok")
    assert (success.policy_domain, success.policy_type, success.result) == (
        "example.net", "sts", "success")
    assert success.policy_string == ("version: STSv1", "mode: enforce", "mx: mx.tern.test",
                                     "max_age: 86400")
    assert (success.mx_host, success.receiving_mx, success.receiving_ip) == (
        ("mx.tern.test",), "mx.tern.test", "127.0.0.1")
    # the MX certificate is not trusted (no CA for it): certificate-not-trusted
    result, _, _ = send(server.port, smtp_mta_sts_CAfile=str(certs.ca),
                        queue_directory=tmp_path / "untrusted", **settings)
    assert isinstance(result, TransientFailure)
    (failure,) = recorded(tmp_path / "untrusted")
    assert (failure.policy_type, failure.result) == ("sts", "certificate-not-trusted")
    # the system's CAs (the Web PKI) do not know the test CA the server sends
    assert failure.reason == ("server certificate verification failed: num=19:self-signed"
                              " certificate in certificate chain")
    # the policy server's certificate is not trusted: sts-webpki-invalid, then no policy
    sts_fetch.CACHE._entries.clear()
    result, _, _ = send(server.port, queue_directory=tmp_path / "webpki", **settings)
    assert_sent(result)
    (fetch,) = recorded(tmp_path / "webpki")
    assert (fetch.policy_type, fetch.result) == ("sts", "sts-webpki-invalid")
    assert "CERTIFICATE_VERIFY_FAILED" in fetch.reason
    # a policy file that is not one: sts-policy-invalid
    sts_fetch.CACHE._entries.clear()
    https.policy = b"version: STSv2\r\n"
    result, _, _ = send(server.port, smtp_mta_sts_CAfile=str(certs.ca),
                        queue_directory=tmp_path / "invalid", **settings)
    assert_sent(result)
    assert [r.result for r in recorded(tmp_path / "invalid")] == ["sts-policy-invalid"]


def test_tlsrpt_off_records_nothing(dns_server, server, policy_server, certs, tmp_path):
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce"))
    result, _, _ = send(server.port, dns_servers=[f"{dns[0]}:{dns[1]}"],
                        smtp_mta_sts_enable=True, smtp_mta_sts_CAfile=str(certs.ca),
                        smtp_mta_sts_https_port=https.port, smtp_tls_CAfile=str(certs.ca),
                        _host="example.net", _mx=True, queue_directory=tmp_path)
    assert_sent(result)
    assert not (tmp_path / "tlsrpt").exists()


def test_tlsrpt_in_testing_mode_reports_what_enforce_would_find(dns_server, server,
                                                                policy_server, certs, tmp_path):
    """testing (RFC 8461 §5): mail goes out opportunistically, the report tells the truth."""
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("testing"))
    settings = dict(dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_mta_sts_enable=True,
                    smtp_mta_sts_CAfile=str(certs.ca), smtp_mta_sts_https_port=https.port,
                    _host="example.net", _mx=True, smtp_tlsrpt_enable=True)
    result, log, _ = send(server.port, queue_directory=tmp_path / "untrusted", **settings)
    assert_sent(result)
    assert "Untrusted TLS connection established to mx.tern.test" in log
    (found,) = recorded(tmp_path / "untrusted")
    assert (found.policy_type, found.result) == ("sts", "certificate-not-trusted")
    assert found.policy_string[1] == "mode: testing"
    result, _, _ = send(server.port, queue_directory=tmp_path / "trusted",
                        smtp_tls_CAfile=str(certs.ca), **settings)
    assert_sent(result)
    assert [r.result for r in recorded(tmp_path / "trusted")] == ["success"]
    sts_fetch.CACHE._entries.clear()
    https.policy = policy("testing", mx="*.example.org")
    result, _, _ = send(server.port, queue_directory=tmp_path / "mx", smtp_tls_CAfile=str(certs.ca),
                        **settings)
    assert_sent(result)
    assert [(r.result, r.reason) for r in recorded(tmp_path / "mx")] == [
        ("validation-failure", "mx-mismatch"), ("success", "")]
