"""MTA-STS end to end: unbound on loopback (MX, _mta-sts TXT, mta-sts host), a local HTTPS
server (the standard library's, with a *.example.net certificate of the test CA) serving the
policy, and deliver() to a real ``tern serve`` (certificate mx.tern.test) by MX."""

import asyncio
import http.server
import io
import socket
import ssl
import threading
import time
import uuid

import pytest
import test_tls_client
import uvloop
from peers import free_port
from test_tls_client import assert_sent, received_over_tls, send

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop, TransientFailure
from engine.delivery.connections import ConnectionCache
from engine.delivery.smtp import deliver
from engine.dns import Resolver
from engine.log import Maillog
from engine.tls import sts_fetch
from engine.tls.mtasts import StsError
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
    sts_fetch.CACHE.clear()


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
    sts_fetch.CACHE.clear()
    https.policy = policy("testing", mx="*.example.org")
    result, log, _ = send(server.port, **settings)
    assert_sent(result)
    assert "MTA-STS testing: MX host mx.tern.test does not match" in log


def test_a_failed_fetch_is_not_repeated_for_every_message(dns_server, server, policy_server,
                                                         certs, monkeypatch):
    """A broken policy server is asked once per policy id and FAILURE_HOLD, not once per
    message; the fetches share one TLS context (one CA bundle load per process)."""
    made = []
    real = ssl.create_default_context
    sts_fetch.verifying_context.cache_clear()
    monkeypatch.setattr(sts_fetch.ssl, "create_default_context",
                        lambda *a, **k: made.append(k) or real(*a, **k))
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(b"not a policy")
    settings = dict(dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_mta_sts_enable=True,
                    smtp_mta_sts_CAfile=str(certs.ca), smtp_mta_sts_https_port=https.port,
                    _host="example.net", _mx=True)
    for _ in range(3):
        result, _, _ = send(server.port, **settings)
        assert_sent(result)  # no policy: opportunistic delivery
    assert https.requests == 1
    sts_fetch.CACHE.clear()  # the hold is over: fetched again, with the same context
    https.policy = policy("enforce")
    send(server.port, **settings)
    assert https.requests == 2
    assert [k.get("cafile") for k in made] == [str(certs.ca)]


def test_a_policy_near_its_end_is_refreshed_in_the_background(dns_server, policy_server, certs):
    """§5.1: the cached policy still answers at once; a new fetch extends its life."""
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(policy("enforce"))
    config = Config(myhostname="client.tern.test", dns_servers=(f"{dns[0]}:{dns[1]}",),
                    smtp_mta_sts_CAfile=str(certs.ca), smtp_mta_sts_https_port=https.port)

    async def run():
        resolver = Resolver(config)
        first = await sts_fetch.sts_policy(config, resolver.dnssec, resolver, "example.net")
        cached, _ = sts_fetch.CACHE._entries["example.net"]
        sts_fetch.CACHE._entries["example.net"] = (cached, time.monotonic() + 10)  # near its end
        second = await sts_fetch.sts_policy(config, resolver.dnssec, resolver, "example.net")
        requests_before_refresh = https.requests
        await sts_fetch._REFRESHING["example.net"]
        _, expires = sts_fetch.CACHE._entries["example.net"]
        return first, second, requests_before_refresh, expires - time.monotonic()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        first, second, before, remaining = runner.run(run())
    assert first == second and first.mode == "enforce"
    assert before == 1 and https.requests == 2
    assert remaining > 86400 - 60  # max_age 86400 from the refresh
    assert sts_fetch._REFRESHING == {}


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
    sts_fetch.CACHE.clear()
    result, _, _ = send(server.port, queue_directory=tmp_path / "webpki", **settings)
    assert_sent(result)
    (fetch,) = recorded(tmp_path / "webpki")
    assert (fetch.policy_type, fetch.result) == ("sts", "sts-webpki-invalid")
    assert "CERTIFICATE_VERIFY_FAILED" in fetch.reason
    # a policy file that is not one: sts-policy-invalid
    sts_fetch.CACHE.clear()
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
    sts_fetch.CACHE.clear()
    https.policy = policy("testing", mx="*.example.org")
    result, _, _ = send(server.port, queue_directory=tmp_path / "mx", smtp_tls_CAfile=str(certs.ca),
                        **settings)
    assert_sent(result)
    assert [(r.result, r.reason) for r in recorded(tmp_path / "mx")] == [
        ("validation-failure", "mx-mismatch"), ("success", "")]


# ---- the HTTPS fetch itself (§3.3): a policy whole or not at all -------------------------------


class RawPolicyServer:
    """HTTPS on 127.0.0.1 that answers one request with ``response`` (raw bytes), then either
    cuts the TCP connection without a TLS close_notify (what an attacker's RST does) or, with
    ``keep_open``, leaves it open until the client hangs up (a server that ignores
    "Connection: close")."""

    def __init__(self, pem, response: bytes, keep_open: bool = False):
        self.response, self.keep_open = response, keep_open
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pem)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        raw, _ = self.listener.accept()
        raw.settimeout(10)
        tls = None
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
            tls.recv(4096)
            tls.sendall(self.response)
            if self.keep_open:
                while tls.recv(4096):
                    pass
            raw = socket.socket(fileno=tls.detach())  # no close_notify: a cut connection
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            if tls is not None:
                tls.close()  # nothing left to close once detached
            raw.close()

    def close(self):
        self.thread.join(10)
        self.listener.close()


def raw_fetch(certs, response: bytes, keep_open: bool = False):
    """sts_fetch.fetch() against a RawPolicyServer: the body, or the StsError's text."""
    https = RawPolicyServer(certs.sni["example.net"], response, keep_open)
    config = Config(myhostname="client.tern.test", smtp_mta_sts_CAfile=str(certs.ca),
                    smtp_mta_sts_https_port=https.port)

    async def run():
        try:
            return await sts_fetch.fetch(config, ["127.0.0.1"], "example.net")
        except StsError as exc:
            return str(exc)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run())
    https.close()
    return result


BODY = policy("enforce")
FAILED = "policy fetch from mta-sts.example.net failed: "


def response(status="200 OK", body=BODY, *headers):
    head = [f"HTTP/1.1 {status}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_fetch_takes_a_complete_body(certs):
    assert raw_fetch(certs, response("200 OK", BODY, "Content-Type: text/plain",
                                          f"Content-Length: {len(BODY)}")) == BODY


def test_fetch_stops_at_content_length_when_the_server_keeps_the_connection(certs, monkeypatch):
    """Without stopping there, the fetch would wait for the server's close (here: the timeout,
    shortened so that a regression fails soon instead of after a minute)."""
    monkeypatch.setattr(sts_fetch, "FETCH_TIMEOUT", 5.0)
    got = raw_fetch(certs, response("200 OK", BODY, "Content-Type: text/plain",
                                         f"Content-Length: {len(BODY)}", "Connection: keep-alive"),
                    keep_open=True)
    assert got == BODY


@pytest.mark.parametrize(("raw", "why"), [
    # an on-path attacker cuts the stream after "max_age: 8": a policy with a tiny max_age
    (response("200 OK", BODY[:BODY.index(b"86400") + 1], "Content-Type: text/plain",
              f"Content-Length: {len(BODY)}"), "truncated response"),
    (response("200 OK", BODY, "Content-Type: text/plain"),
     "policy response without Content-Length"),
    (response("200 OK", b"20\r\n" + BODY[:32] + b"\r\n", "Content-Type: text/plain",
              "Transfer-Encoding: chunked"), "truncated response"),
    (response("200 OK", b"", "Content-Type: text/plain", "Content-Length: 70000"),
     "policy larger than 64 KiB"),
    (response("200 OK", b"8000\r\n%s\r\n8001\r\n%s\r\n0\r\n\r\n" % (b"x" * 0x8000, b"x" * 0x8001),
              "Content-Type: text/plain", "Transfer-Encoding: chunked"),
     "policy larger than 64 KiB"),
    (response("404 Not Found", b"", "Content-Type: text/plain", "Content-Length: 0"),
     "HTTP status 'HTTP/1.1 404 Not Found'"),
    (response("301 Moved Permanently", b"", "Location: https://elsewhere.example/",
              "Content-Type: text/plain", "Content-Length: 0"),
     "HTTP status 'HTTP/1.1 301 Moved Permanently'"),
    (response("200 OK", BODY, "Content-Type: text/html", f"Content-Length: {len(BODY)}"),
     "policy is not text/plain"),
], ids=["truncated", "no-length", "chunked-truncated", "oversized", "oversized-chunked",
        "not-found", "redirect", "content-type"])
def test_fetch_refuses(certs, raw, why):
    assert raw_fetch(certs, raw) == FAILED + why


def test_fetch_takes_a_complete_chunked_body(certs):
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, BODY[:10], len(BODY) - 10, BODY[10:])
    assert raw_fetch(certs, response("200 OK", chunked,
                                          "Content-Type: text/plain; charset=utf-8",
                                          "Transfer-Encoding: chunked")) == BODY


def test_a_cached_session_never_carries_mail_under_a_policy_that_appeared_since(
        dns_server, server, sink, policy_server, certs):
    """The first delivery finds no usable policy and leaves its plaintext session in the
    connection cache; once the enforce policy is there, the next delivery must not reuse that
    session (Postfix's TLS-aware connection cache) but open one that MTA-STS verifies."""
    dns = dns_server(RECORDS, zones=("example.net.", "tern.test."))
    https = policy_server(b"not a policy")
    config = Config(myhostname="client.tern.test", dns_servers=(f"{dns[0]}:{dns[1]}",),
                    smtp_mta_sts_enable=True, smtp_mta_sts_CAfile=str(certs.ca),
                    smtp_mta_sts_https_port=https.port, smtp_tls_CAfile=str(certs.ca),
                    smtp_connect_timeout=5.0)
    markers = [uuid.uuid4().hex, uuid.uuid4().hex]
    stream = io.StringIO()
    maillog = Maillog("client.tern.test", stream=stream)

    async def run():
        cache = ConnectionCache(config)
        outcomes = []
        for marker in markers:
            request = DeliveryRequest("4Xyz", "a@x.test", ["b@example.net"],
                                      f"Subject: {marker}\r\n\r\nbody\r\n".encode(),
                                      NextHop("smtp", "example.net", server.port, True))
            outcomes.append(await deliver(request, config, Resolver(config), cache, maillog))
            https.policy = policy("enforce")
            sts_fetch.CACHE.clear()  # as when the failed fetch's hold is over
        await cache.close()
        return outcomes

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        first, second = runner.run(run())
    maillog.flush()
    assert [r.status for r in first.results + second.results] == ["sent", "sent"]
    assert second.conn_use == 1  # a new connection
    assert not received_over_tls(sink, markers[0])
    assert received_over_tls(sink, markers[1])
    assert stream.getvalue().count("Verified TLS connection established to mx.tern.test") == 1
