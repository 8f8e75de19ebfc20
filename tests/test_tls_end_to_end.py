"""TLS against a real ``tern serve`` with real TLS clients: smtplib (STARTTLS and SMTP_SSL),
``openssl s_client`` and ``swaks --tls``, on an smtp (STARTTLS, SNI), a submission and an smtps
listener. Messages are relayed to Postfix's smtp-sink so the Received: header can be read."""

import re
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
import warnings

import pytest
from peers import SmtpSink, free_port
from tern_process import TernServer
from tls_certs import DEFAULT_NAME, make_certs

CLIENT_TIMEOUT = 10


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def start_tls_server(directory, certs, sink=None, **settings) -> TernServer:
    """A tern with the default certificate on its smtp listener, two SNI entries, and a
    submission and an smtps listener (``server.ports["submission"]``, ``["smtps"]``)."""
    passwd = directory / "passwd"  # a submission listener needs AUTH's credentials (none here)
    passwd.touch()
    base = {"smtpd_tls_cert_file": str(certs.default_cert),
            "smtpd_tls_key_file": str(certs.default_key), "smtpd_sasl_password_file": str(passwd)}
    if sink is not None:
        base["relayhost"] = sink.nexthop
    server = TernServer(directory, {**base, **settings})
    server.ports = {"smtp": server.port, "submission": free_port(), "smtps": free_port()}
    extra = ["[tls_server_sni_maps]",
             f'"mail.example.org" = "{certs.sni["mail.example.org"]}"',
             f'"example.net" = "{certs.sni["example.net"]}"',
             f'".example.net" = "{certs.sni["example.net"]}"']
    for service in ("submission", "smtps"):
        extra += ["[[listen]]", f'address = "127.0.0.1:{server.ports[service]}"',
                  f'service = "{service}"']
    with server.config_file.open("a") as config:
        config.write("\n".join(extra) + "\n")
    return server.start()


@pytest.fixture(scope="module")
def sink():
    sink = SmtpSink().start()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs, sink):
    # openssl s_client writes its whole stdin (EHLO, QUIT) at once: improper pipelining,
    # allowed here (tests/test_abuse_pipelining.py covers the default)
    server = start_tls_server(tmp_path_factory.mktemp("tern"), certs, sink,
                              smtpd_forbid_unauth_pipelining=False)
    yield server
    server.stop()


def client_context(certs, **options) -> ssl.SSLContext:
    """A verifying client context that trusts the test CA (host names are checked by the
    tests themselves, against the subject the server chose)."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.check_hostname = False
    for name, value in options.items():
        setattr(context, name, value)
    return context


def peer_common_name(sock: ssl.SSLSocket) -> str:
    subject = dict(item[0] for item in sock.getpeercert()["subject"])
    return subject["commonName"]


def message_with(sink: SmtpSink, marker: str) -> bytes:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in sink.messages():
            if marker.encode() in message.content:
                return message.content.replace(b"\r\n", b"\n")
        time.sleep(0.05)
    raise AssertionError(f"no message with {marker} reached the sink")


class NewLog:
    """Waits for a maillog line that appears after this point (the module's server is shared,
    so an older line must not satisfy a later test)."""

    def __init__(self, server: TernServer, text: str) -> None:
        self.server, self.text = server, text
        self.before = server.log().count(text)

    def wait(self) -> str:
        return self.server.wait_log(self.text, self.before + 1)


def body(marker: str) -> str:
    return f"Subject: {marker}\r\n\r\nhello over TLS\r\n"


RECEIVED_TLS = re.compile(
    rb"Received: from client\.test \(unknown \[127\.0\.0\.1\]\)\n"
    rb"\t\(using (TLSv1\.[23]) with cipher (\S+) \((\d+)/\3 bits\)\)\n"
    rb"\tby mx\.tern\.test \(Tern\) with ESMTPS id ")


# -- STARTTLS on the smtp listener -------------------------------------------------------------


def test_starttls_with_smtplib_delivers_and_received_records_tls(server, sink, certs):
    marker = uuid.uuid4().hex
    established = NewLog(server, "Anonymous TLS connection established from "
                                 "unknown[127.0.0.1]: TLSv1.3 with cipher TLS_")
    summary = NewLog(server, "ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=7")
    with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        code, reply = client.starttls(context=client_context(certs))
        assert (code, reply) == (220, b"2.0.0 Ready to start TLS")
        assert peer_common_name(client.sock) == DEFAULT_NAME
        client.ehlo("client.test")
        assert not client.has_extn("starttls")  # RFC 3207 §4.2: not offered again
        assert client.sendmail("alice@example.org", ["bob@example.net"], body(marker)) == {}
    content = message_with(sink, marker)
    received = RECEIVED_TLS.search(content)
    assert received is not None, content
    assert received[1] == b"TLSv1.3" and received[2].startswith(b"TLS_")
    established.wait()
    summary.wait()


def test_mail_after_the_handshake_needs_a_new_ehlo_and_starttls_is_refused_twice(server, certs):
    with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("client.test")
        client.starttls(context=client_context(certs))
        # the EHLO before TLS is forgotten: no MAIL until the client says EHLO again
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (
            503, b"5.5.1 Error: send HELO/EHLO first")
        assert client.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        client.ehlo("client.test")
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (250, b"2.1.0 Ok")


def test_plaintext_pipelined_after_starttls_is_discarded(server, certs):
    """CVE-2011-0411: commands sent in plaintext behind STARTTLS must not be read as if they
    came over TLS. The MAIL injected here would be answered by the first reply after the
    handshake, and would make the RCPT below succeed."""
    with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT) as raw:
        stream = raw.makefile("rb")
        assert stream.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
        while not (line := stream.readline()).startswith(b"250 "):
            assert line.startswith(b"250-")
        assert stream.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        tls = client_context(certs).wrap_socket(raw, server_hostname=DEFAULT_NAME)
        tls_stream = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        first = tls_stream.readline()
        assert first == b"250-mx.tern.test\r\n"  # the EHLO's, not RSET's or MAIL's 250
        while not tls_stream.readline().startswith(b"250 "):
            pass
        tls.sendall(b"RCPT TO:<bob@example.net>\r\nQUIT\r\n")
        assert tls_stream.readline() == b"503 5.5.1 Error: need MAIL command\r\n"
        assert tls_stream.readline() == b"221 2.0.0 Bye\r\n"
        tls.close()
    server.wait_log("ehlo=2 starttls=1 rcpt=1 quit=1 commands=5")  # no RSET, no MAIL


@pytest.mark.parametrize("servername, subject", [
    ("mail.example.org", "mail.example.org"),  # an exact entry
    ("smtp.example.net", "example.net"),  # a subdomain, through the ".example.net" entry
    ("unlisted.example.com", DEFAULT_NAME),  # no entry: the default certificate
])
def test_openssl_s_client_starttls_gets_the_sni_certificate(server, certs, servername, subject):
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{server.port}",
         "-servername", servername, "-CAfile", str(certs.ca), "-verify_return_error"],
        input=b"", capture_output=True, timeout=CLIENT_TIMEOUT)
    out = result.stdout.decode()
    assert re.search(rf"^subject=CN ?= ?{re.escape(subject)}$", out, re.M), out
    assert "Verify return code: 0 (ok)" in out
    assert re.search(r"New, TLSv1\.3, Cipher is TLS_", out), out


def test_swaks_tls_delivers(server, sink):
    marker = uuid.uuid4().hex
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(server.port), "--tls",
         "--ehlo", "client.test", "--from", "alice@example.org", "--to", "carol@example.net",
         "--header", f"Subject: {marker}", "--body", "sent by swaks"],
        capture_output=True, timeout=30)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "<-  220 2.0.0 Ready to start TLS" in out  # swaks: "<-" plaintext, "<~" under TLS
    assert "=== TLS started with cipher TLSv1.3:TLS_" in out
    assert "<-  250-STARTTLS" in out and "<~  250-STARTTLS" not in out
    assert RECEIVED_TLS.search(message_with(sink, marker))


# -- protocol versions and ciphers ---------------------------------------------------------------


def test_tls_1_1_client_is_refused_and_logged(server, certs):
    with warnings.catch_warnings():  # the client side of this test is deprecated on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        old = client_context(certs, minimum_version=ssl.TLSVersion.TLSv1,
                             maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    refused = NewLog(server, "SSL_accept error from unknown[127.0.0.1]: unsupported protocol")
    lost = NewLog(server, "lost connection after STARTTLS from unknown[127.0.0.1]")
    with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("client.test")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            client.starttls(context=old)
    refused.wait()
    lost.wait()


def test_tls_1_2_client_gets_ecdhe_aead_and_a_cbc_only_client_is_refused(server, certs):
    tls12 = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("client.test")
        client.starttls(context=tls12)
        name, version, _ = client.sock.cipher()
        assert version == "TLSv1.2"
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
    refused = NewLog(server, "SSL_accept error from unknown[127.0.0.1]: no shared cipher")
    cbc = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA")
    with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("client.test")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            client.starttls(context=cbc)
    refused.wait()


# -- submission and smtps ------------------------------------------------------------------------


def test_submission_offers_starttls_and_refuses_mail_before_it(server, certs):
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert client.docmd("MAIL", "FROM:<alice@example.org>") == (
            530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=client_context(certs))
        client.ehlo("client.test")
        assert not client.has_extn("starttls")


def test_smtps_with_smtplib_smtp_ssl(server, sink, certs):
    marker = uuid.uuid4().hex
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], timeout=CLIENT_TIMEOUT,
                          context=client_context(certs)) as client:
        assert peer_common_name(client.sock) == DEFAULT_NAME
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        assert client.sendmail("alice@example.org", ["dave@example.net"], body(marker)) == {}
    assert RECEIVED_TLS.search(message_with(sink, marker))


def test_smtps_with_openssl_s_client_greets_after_the_handshake(server, certs):
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.ports['smtps']}",
         "-servername", "mail.example.org", "-CAfile", str(certs.ca), "-verify_return_error",
         "-ign_eof", "-nocommands"],
        input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True, timeout=CLIENT_TIMEOUT)
    out = result.stdout.decode()
    assert re.search(r"^subject=CN ?= ?mail\.example\.org$", out, re.M), out
    assert "220 mx.tern.test ESMTP Tern" in out
    assert "250-mx.tern.test" in out and "STARTTLS" not in out
    assert "221 2.0.0 Bye" in out


def test_a_plaintext_client_on_smtps_gets_no_greeting(server):
    refused = NewLog(server, "SSL_accept error from unknown[127.0.0.1]")
    with socket.create_connection(("127.0.0.1", server.ports["smtps"]),
                                  timeout=CLIENT_TIMEOUT) as raw:
        raw.sendall(b"EHLO client.test\r\n")  # not a ClientHello
        data = b""
        while chunk := raw.recv(4096):
            data += chunk
        assert b"220" not in data and b"250" not in data
    refused.wait()


# -- settings ------------------------------------------------------------------------------------


def test_security_level_encrypt_refuses_mail_before_starttls(tmp_path, certs):
    server = start_tls_server(tmp_path, certs, smtpd_tls_security_level="encrypt")
    try:
        with smtplib.SMTP(*server.address, timeout=CLIENT_TIMEOUT) as client:
            client.ehlo("client.test")
            assert client.docmd("MAIL", "FROM:<alice@example.org>") == (
                530, b"5.7.0 Must issue a STARTTLS command first")
            client.starttls(context=client_context(certs))
            client.ehlo("client.test")
            assert client.docmd("MAIL", "FROM:<alice@example.org>") == (250, b"2.1.0 Ok")
    finally:
        server.stop()


def test_a_stalled_handshake_ends_at_smtpd_timeout(tmp_path, certs):
    """And gives back what it held: with room for one session (and one per client), the next
    client is greeted, not refused, once the stalled handshake was cut."""
    server = start_tls_server(tmp_path, certs, smtpd_timeout="1s", worker_count=1,
                              smtpd_connection_limit=1, smtpd_client_connection_count_limit=1,
                              smtpd_client_event_limit_exceptions=[])
    try:
        disconnect = "disconnect from unknown[127.0.0.1]"
        server.wait_log(disconnect)  # the start-up probe's session is over
        with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT) as raw:
            stream = raw.makefile("rb")
            stream.readline()
            raw.sendall(b"STARTTLS\r\n")
            assert stream.readline() == b"220 2.0.0 Ready to start TLS\r\n"
            started = time.monotonic()
            assert raw.recv(100) == b""  # no ClientHello from us: it hangs up, no plaintext 421
            assert time.monotonic() - started >= 0.5
        log = server.wait_log("timeout after STARTTLS from unknown[127.0.0.1]")
        assert "SSL_accept error" not in log  # our timeout, not a handshake failure
        server.wait_log(f"{disconnect} starttls=1 commands=1")  # the stalled session's
        with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT) as client:
            greeting = client.makefile("rb").readline()
        assert greeting.startswith(b"220 ")  # the slot and the anvil count were given back
        log = server.wait_log(disconnect, count=3)
        assert "too many connections" not in log and "connection limit" not in log
    finally:
        server.stop()


def test_an_expired_certificate_is_logged_at_start(tmp_path, certs):
    server = start_tls_server(tmp_path, certs, smtpd_tls_cert_file=str(certs.expired_cert),
                              smtpd_tls_key_file=str(certs.expired_key))
    try:
        server.wait_log(f"warning: {certs.expired_cert}: certificate expired on ")
    finally:
        server.stop()
