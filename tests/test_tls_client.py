"""Outbound TLS end to end: engine.delivery.smtp.deliver() against a real ``tern serve``
(STARTTLS on its smtp listener, implicit TLS on its smtps listener) and Postfix's smtp-sink
(no STARTTLS), at every security level, with Postfix's log lines and deferral texts."""

import asyncio
import hashlib
import io
import ssl
import subprocess
import time
import uuid

import pytest
import uvloop
from peers import SmtpSink, _stop_process, _tcp_listening, free_port
from test_tls_end_to_end import message_with, start_tls_server
from tls_certs import make_certs

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop, TransientFailure
from engine.delivery.smtp import deliver
from engine.dns import Resolver
from engine.log import Maillog
from engine.tls.tlsrpt_store import ResultStore, today

HOP = "[127.0.0.1]:{port}"  # the next hop as written: smtp_tls_policy_maps's key for send()
ESTABLISHED = "TLS connection established to 127.0.0.1[127.0.0.1]:{port}: TLSv1.3 with cipher TLS_"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def sink():
    sink = SmtpSink().start()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs, sink):
    server = start_tls_server(tmp_path_factory.mktemp("tern"), certs, sink)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls13_server(tmp_path_factory, certs, sink):
    """Offers STARTTLS but speaks TLS 1.3 only: a TLS 1.2-only client's handshake fails."""
    server = start_tls_server(tmp_path_factory.mktemp("tern13"), certs, sink,
                              smtpd_tls_protocols=">=TLSv1.3")
    yield server
    server.stop()


def send(port, *, tmp_path=None, policy_entries=None, _host="127.0.0.1", _mx=False,
         **settings):
    """deliver() one message to 127.0.0.1:port (``policy_entries`` keys may name "{port}",
    see HOP); returns (outcome or the TransientFailure,
    the maillog text, the marker in the message)."""
    if policy_entries is not None:
        table = tmp_path / "tls_policy"
        table.write_text("".join(f"{key.format(port=port)} {value}\n"
                                 for key, value in policy_entries.items()))
        settings["smtp_tls_policy_maps"] = f"texthash:{table}"
    config = Config(myhostname="client.tern.test", smtp_connect_timeout=5.0,
                    smtp_starttls_timeout=10.0, **settings)
    marker = uuid.uuid4().hex
    request = DeliveryRequest("4Xyz", "a@x.test", ["b@example.net"],
                              f"Subject: {marker}\r\n\r\nbody\r\n".encode(),
                              NextHop("smtp", _host, port, _mx))
    stream = io.StringIO()
    maillog = Maillog("client.tern.test", stream=stream)

    async def run():
        try:
            return await deliver(request, config, Resolver(config), maillog=maillog)
        except TransientFailure as exc:
            return exc

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run())
    maillog.flush()
    return result, stream.getvalue(), marker


def assert_sent(result):
    assert not isinstance(result, Exception), result
    assert [r.status for r in result.results] == ["sent"]


def received_over_tls(sink, marker) -> bool:
    return b"with ESMTPS id" in message_with(sink, marker)


# ---- none, may, encrypt ----------------------------------------------------------------------


def test_none_is_the_default_and_sends_in_plaintext(server, sink):
    result, log, marker = send(server.port)
    assert_sent(result)
    assert not received_over_tls(sink, marker)
    assert "TLS connection established" not in log


def test_may_uses_starttls_and_logs_untrusted(server, sink):
    result, log, marker = send(server.port, smtp_tls_security_level="may")
    assert_sent(result)
    assert received_over_tls(sink, marker)
    assert "Untrusted " + ESTABLISHED.format(port=server.port) in log


def test_may_without_starttls_delivers_in_plaintext(sink):
    result, log, _ = send(sink.port, smtp_tls_security_level="may")
    assert_sent(result)
    assert "TLS connection established" not in log


def test_encrypt_to_a_server_without_starttls_defers(sink):
    result, _, _ = send(sink.port, smtp_tls_security_level="encrypt")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == (
        "4.7.4", "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]")


def test_may_retries_in_plaintext_after_a_failed_handshake(tls13_server, sink):
    result, log, marker = send(tls13_server.port, smtp_tls_security_level="may",
                               smtp_tls_protocols="TLSv1.2")
    assert_sent(result)
    assert f"SSL_connect error to 127.0.0.1[127.0.0.1]:{tls13_server.port}: " in log
    assert not received_over_tls(sink, marker)


def test_encrypt_defers_after_a_failed_handshake(tls13_server):
    result, log, _ = send(tls13_server.port, smtp_tls_security_level="encrypt",
                          smtp_tls_protocols="TLSv1.2")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Cannot start TLS: handshake failure")
    assert result.relay == f"127.0.0.1[127.0.0.1]:{tls13_server.port}"


def test_encrypt_delivers_over_tls(server, sink):
    result, log, marker = send(server.port, smtp_tls_security_level="encrypt")
    assert_sent(result)
    assert received_over_tls(sink, marker)


# ---- verify, secure, fingerprint -------------------------------------------------------------


def test_verify_with_a_matching_name_logs_verified(server, sink, certs, tmp_path):
    result, log, marker = send(server.port, tmp_path=tmp_path, smtp_tls_CAfile=str(certs.ca),
                               policy_entries={HOP: "verify match=mx.tern.test"})
    assert_sent(result)
    assert received_over_tls(sink, marker)
    assert "Verified " + ESTABLISHED.format(port=server.port) in log


def test_secure_with_a_name_mismatch_is_trusted_but_defers(server, certs):
    """secure's default match is the next hop (here 127.0.0.1) and its subdomains: the
    chain is trusted, the name mx.tern.test is not."""
    result, log, _ = send(server.port, smtp_tls_security_level="secure",
                          smtp_tls_CAfile=str(certs.ca))
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not verified")
    assert "Trusted " + ESTABLISHED.format(port=server.port) in log


def test_secure_with_parent_domain_match(server, certs, tmp_path):
    result, log, _ = send(server.port, tmp_path=tmp_path, smtp_tls_CAfile=str(certs.ca),
                          policy_entries={HOP: "secure match=.tern.test"})
    assert_sent(result)
    assert "Verified " + ESTABLISHED.format(port=server.port) in log


def test_verify_with_an_unknown_ca_defers_untrusted(server, other_ca):
    result, log, _ = send(server.port, smtp_tls_security_level="verify",
                          smtp_tls_CAfile=str(other_ca.ca))
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not trusted")
    assert f"server certificate verification failed for 127.0.0.1[127.0.0.1]:{server.port}:" \
        in log


def leaf_fingerprint(certs, digest="sha256") -> str:
    pem = certs.default_cert.read_text()
    der = ssl.PEM_cert_to_DER_cert(pem[:pem.index("-----END CERTIFICATE-----") + 25])
    value = hashlib.new(digest, der).hexdigest().upper()
    return ":".join(value[i:i + 2] for i in range(0, len(value), 2))


@pytest.mark.parametrize("digest", ["sha256", "sha512"])
def test_fingerprint_match_is_verified(server, certs, tmp_path, digest):
    result, log, _ = send(server.port, tmp_path=tmp_path, smtp_tls_fingerprint_digest=digest,
                          policy_entries={HOP: "fingerprint match="
                                          + leaf_fingerprint(certs, digest)})
    assert_sent(result)
    assert "Verified " + ESTABLISHED.format(port=server.port) in log


def test_fingerprint_mismatch_defers(server, other_ca, tmp_path):
    result, log, _ = send(server.port, tmp_path=tmp_path,
                          policy_entries={HOP: "fingerprint match="
                                          + leaf_fingerprint(other_ca)})
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not verified")
    assert "Untrusted " + ESTABLISHED.format(port=server.port) in log


# ---- policy table, wrapper mode --------------------------------------------------------------


def test_policy_table_entry_of_the_next_hop_as_written_overrides_the_default(sink, tmp_path):
    """Postfix looks up "[127.0.0.1]:PORT" as the transport or relayhost writes it; the bare
    host and parent-domain keys are only for a domain next hop (MX lookup, default port)."""
    result, _, _ = send(sink.port, tmp_path=tmp_path, smtp_tls_security_level="may",
                        policy_entries={HOP: "encrypt"})
    assert isinstance(result, TransientFailure) and result.dsn == "4.7.4"
    result, _, _ = send(sink.port, tmp_path=tmp_path, smtp_tls_security_level="may",
                        policy_entries={"127.0.0.1": "encrypt", ".0.1": "encrypt",
                                        "[127.0.0.1]": "encrypt"})
    assert_sent(result)


def test_policy_table_entry_that_cannot_be_applied_defers(sink, tmp_path):
    result, _, _ = send(sink.port, tmp_path=tmp_path, policy_entries={HOP: "danger"})
    assert isinstance(result, TransientFailure)
    assert result.dsn == "4.7.5"
    assert result.text.startswith("TLS policy lookup for 127.0.0.1: unsupported TLS security")


def test_wrappermode_speaks_tls_from_the_first_byte(server, sink):
    port = server.ports["smtps"]
    result, log, marker = send(port, smtp_tls_wrappermode=True)
    assert_sent(result)
    assert received_over_tls(sink, marker)
    assert "Untrusted " + ESTABLISHED.format(port=port) in log


def test_wrappermode_to_a_plaintext_server_fails(sink):
    result, log, _ = send(sink.port, smtp_tls_wrappermode=True, smtp_helo_timeout=3.0)
    assert isinstance(result, TransientFailure)
    assert result.text == "Cannot start TLS: handshake failure"


def test_wrappermode_never_falls_back_to_plaintext(dns_server, sink):
    """At "dane" without DNSSEC the level is "may", whose failed handshake Postfix follows with
    plaintext; in wrapper mode (port 465) there is no plaintext to fall back to."""
    dns = dns_server(["example.net. 60 IN MX 10 mx.tern.test.", "mx.tern.test. 60 IN A 127.0.0.1"],
                     zones=("example.net.", "tern.test."))
    result, log, _ = send(sink.port, smtp_tls_wrappermode=True, smtp_tls_security_level="dane",
                          dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_helo_timeout=3.0,
                          _host="example.net", _mx=True)
    assert isinstance(result, TransientFailure), result
    assert (result.dsn, result.text) == ("4.7.5", "Cannot start TLS: handshake failure")


# ---- Postfix's trust words: Trusted, Untrusted, Verified, Anonymous --------------------------


@pytest.fixture(scope="module")
def expired_server(tmp_path_factory, certs, sink):
    """STARTTLS with a leaf (mx.tern.test, from the test CA) that expired yesterday."""
    server = start_tls_server(tmp_path_factory.mktemp("expired"), certs, sink,
                              smtpd_tls_cert_file=str(certs.expired_cert),
                              smtpd_tls_key_file=str(certs.expired_key))
    yield server
    server.stop()


def test_may_with_the_servers_ca_logs_trusted(server, sink, certs):
    """smtp_tls_CAfile set: the chain is checked at "may" too, and a trusted one says so."""
    result, log, marker = send(server.port, smtp_tls_security_level="may",
                               smtp_tls_CAfile=str(certs.ca))
    assert_sent(result)
    assert received_over_tls(sink, marker)
    assert "Trusted " + ESTABLISHED.format(port=server.port) in log
    assert "Untrusted" not in log and "verification failed" not in log


def test_encrypt_with_a_hashed_ca_directory_logs_trusted(server, certs, tmp_path):
    capath = tmp_path / "capath"
    capath.mkdir()
    (capath / "test-ca.pem").write_bytes(certs.ca.read_bytes())
    subprocess.run(["openssl", "rehash", str(capath)], check=True, capture_output=True)
    result, log, _ = send(server.port, smtp_tls_security_level="encrypt",
                          smtp_tls_CApath=str(capath))
    assert_sent(result)
    assert "Trusted " + ESTABLISHED.format(port=server.port) in log


def test_may_with_another_ca_logs_untrusted_and_delivers(server, other_ca):
    """Only the levels that need trust log why the chain was not trusted (Postfix)."""
    result, log, _ = send(server.port, smtp_tls_security_level="may",
                          smtp_tls_CAfile=str(other_ca.ca))
    assert_sent(result)
    assert "Untrusted " + ESTABLISHED.format(port=server.port) in log
    assert "verification failed" not in log


def test_system_cas_only_with_tls_append_default_CA(server, certs, tmp_path, monkeypatch):
    """OpenSSL's default CAs (here SSL_CERT_FILE = the test CA) are not trusted unless
    tls_append_default_CA = yes, as Postfix: "Untrusted", then "Trusted"."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    result, log, _ = send(server.port, smtp_tls_security_level="may")
    assert_sent(result)
    assert "Untrusted " + ESTABLISHED.format(port=server.port) in log
    result, log, _ = send(server.port, smtp_tls_security_level="may", tls_append_default_CA=True)
    assert_sent(result)
    assert "Trusted " + ESTABLISHED.format(port=server.port) in log
    assert "Untrusted" not in log


def test_verify_without_any_ca_is_untrusted_and_defers(server):
    result, log, _ = send(server.port, tmp_path=None, smtp_tls_security_level="verify")
    assert isinstance(result, TransientFailure)
    assert (result.dsn, result.text) == ("4.7.5", "Server certificate not trusted")
    relay = f"127.0.0.1[127.0.0.1]:{server.port}"
    failed = (f"server certificate verification failed for {relay}:"
              f" num=20:unable to get local issuer certificate")
    established = "Untrusted " + ESTABLISHED.format(port=server.port)
    assert failed in log and established in log
    assert log.index(failed) < log.index(established)  # Postfix: the check, then the session


def test_expired_chain_is_untrusted(expired_server, certs, tmp_path):
    port = expired_server.port
    result, log, _ = send(port, smtp_tls_security_level="may", smtp_tls_CAfile=str(certs.ca))
    assert_sent(result)
    assert "Untrusted " + ESTABLISHED.format(port=port) in log
    result, log, _ = send(port, tmp_path=tmp_path, smtp_tls_CAfile=str(certs.ca),
                          policy_entries={HOP: "verify match=mx.tern.test"})
    assert isinstance(result, TransientFailure)
    assert result.text == "Server certificate not trusted"
    assert (f"server certificate verification failed for 127.0.0.1[127.0.0.1]:{port}:"
            f" num=10:certificate has expired") in log


ANONYMOUS_CIPHERS = "aNULL:-aNULL:HIGH:MEDIUM:@STRENGTH:@SECLEVEL=0"


@pytest.fixture
def anonymous_server():
    """``openssl s_server`` without a certificate (anonymous TLS 1.2 suites only), implicit
    TLS, replaying one SMTP server's replies from its stdin; one connection."""
    port = free_port()
    replies = b"".join(line + b"\r\n" for line in (
        b"220 anon.test ESMTP", b"250 anon.test", b"250 2.1.0 Ok", b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>", b"250 2.0.0 Ok: queued", b"221 2.0.0 Bye"))
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-nocert", "-naccept", "1",
         "-cipher", "aNULL:@SECLEVEL=0", "-tls1_2", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.stdin.write(replies)
    proc.stdin.flush()
    deadline = time.monotonic() + 5
    while not _tcp_listening("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    proc.stdin.close()
    _stop_process(proc)


def test_no_certificate_is_anonymous(anonymous_server):
    """An anonymous suite at "encrypt" (Postfix offers aNULL below the verifying levels)."""
    result, log, _ = send(anonymous_server, smtp_tls_security_level="encrypt",
                          smtp_tls_wrappermode=True, tls_medium_cipherlist=ANONYMOUS_CIPHERS)
    assert_sent(result)
    assert (f"Anonymous TLS connection established to 127.0.0.1[127.0.0.1]:{anonymous_server}:"
            f" TLSv1.2 with cipher ") in log


def test_verifying_levels_never_offer_anonymous_suites(anonymous_server):
    result, log, _ = send(anonymous_server, smtp_tls_security_level="verify",
                          smtp_tls_wrappermode=True, tls_medium_cipherlist=ANONYMOUS_CIPHERS)
    assert isinstance(result, TransientFailure)
    assert result.text == "Cannot start TLS: handshake failure"
    assert "TLS connection established" not in log


def test_tlsrpt_records_tls_failures_without_a_policy(server, expired_server, sink, certs,
                                                      tmp_path):
    """No MTA-STS or DANE: the sessions go under "no-policy-found" (RFC 8460 §4.4)."""
    runs = {
        "success": (server.port, {"smtp_tls_security_level": "may"}),
        "starttls-not-supported": (sink.port, {"smtp_tls_security_level": "encrypt"}),
        "certificate-expired": (expired_server.port, {"smtp_tls_security_level": "verify",
                                                      "smtp_tls_CAfile": str(certs.ca)}),
        "certificate-host-mismatch": (server.port, {"smtp_tls_security_level": "secure",
                                                    "smtp_tls_CAfile": str(certs.ca)}),
    }
    for kind, (port, settings) in runs.items():
        send(port, smtp_tlsrpt_enable=True, queue_directory=tmp_path / kind, **settings)
        (found,) = ResultStore(tmp_path / kind).read(today())
        assert (found.policy_domain, found.policy_type, found.result) == (
            "127.0.0.1", "no-policy-found", kind)
        assert found.receiving_ip == "127.0.0.1"
