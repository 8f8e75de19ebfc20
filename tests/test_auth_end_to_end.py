"""AUTH end to end: ``tern passwd`` writes the entries a running ``tern serve`` checks, a
password change takes effect without a restart, AUTH is offered only after STARTTLS (smtplib,
swaks --tls), and the maillog never holds a password."""

import base64
import re
import smtplib
import ssl
import subprocess
import sys

import pytest
from peers import free_port
from tern_process import REPO, TernServer
from tls_certs import make_certs


def tern_passwd(path, user, password, scheme="BLF-CRYPT"):
    done = subprocess.run([sys.executable, "-m", "engine", "passwd", "--scheme", scheme,
                           "--file", str(path), user], cwd=REPO, input=password + "\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def login(server, user, password) -> int:
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        try:
            code = client.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code
        client.mail("sender@example.org")
        assert client.rcpt("someone@example.net")[0] == 250  # relayed for the user
        client.rset()
        return code


def test_tern_passwd_entries_are_accepted_by_a_running_server(tern, tmp_path):
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice@example.test", "first password")
    server = tern(smtpd_sasl_auth_enable=True, smtpd_tls_auth_only=False,
                  smtpd_sasl_password_file=str(passwd), mynetworks="192.0.2.0/24")
    assert login(server, "alice@example.test", "first password") == 235
    assert login(server, "alice@example.test", "second password") == 535
    tern_passwd(passwd, "alice@example.test", "second password", scheme="ARGON2ID")
    tern_passwd(passwd, "bob", "bob password", scheme="SHA512-CRYPT")
    assert login(server, "alice@example.test", "second password") == 235  # no restart
    assert login(server, "alice@example.test", "first password") == 535
    assert login(server, "bob", "bob password") == 235
    log = server.wait_log("disconnect from", count=5)
    assert log.count("sasl_username=alice@example.test") == 2
    assert log.count("SASL PLAIN authentication failed: authentication failure") == 2
    for secret in ("first password", "second password", "bob password"):
        assert secret not in log
        assert base64.b64encode(secret.encode()).decode() not in log
        for user in ("alice@example.test", "bob"):
            assert base64.b64encode(f"\0{user}\0{secret}".encode()).decode() not in log


def test_a_bad_password_file_stops_the_server_naming_the_line(tern, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}x\nbob {PLAIN}y\n")
    server = tern(start=False, smtpd_sasl_auth_enable=True, smtpd_sasl_password_file=str(passwd))
    with pytest.raises(RuntimeError, match=rf"smtpd_sasl_password_file: {passwd}:2: expected"):
        server.start()


# -- AUTH after STARTTLS (smtpd_tls_auth_only's default) ---------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def client_context(certs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.check_hostname = False
    return context


def start_with_submission(directory, certs, sink, passwd) -> TernServer:
    """tern serve with a certificate, the password file, and a submission listener beside
    its smtp one (``server.submission``); relayed mail goes to ``sink``."""
    server = TernServer(directory, {
        "smtpd_tls_cert_file": str(certs.default_cert),
        "smtpd_tls_key_file": str(certs.default_key), "smtpd_sasl_auth_enable": True,
        "smtpd_sasl_password_file": str(passwd), "mynetworks": "192.0.2.0/24",
        "relayhost": sink.nexthop})
    server.submission = free_port()
    with server.config_file.open("a") as config:
        config.write(f'[[listen]]\naddress = "127.0.0.1:{server.submission}"\n'
                     'service = "submission"\n')
    return server.start()


def test_auth_after_starttls_on_submission(tmp_path, certs, smtp_sink):
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice@example.test", "tls password")
    sink = smtp_sink()
    (tmp_path / "tern").mkdir()
    server = start_with_submission(tmp_path / "tern", certs, sink, passwd)
    try:
        with smtplib.SMTP("127.0.0.1", server.submission, timeout=10) as client:
            client.ehlo("client.test")
            assert client.has_extn("starttls") and not client.has_extn("auth")
            token = base64.b64encode(b"\0alice@example.test\0tls password").decode()
            assert client.docmd("AUTH", f"PLAIN {token}") == (
                530, b"5.7.0 Must issue a STARTTLS command first")
            client.starttls(context=client_context(certs))
            client.ehlo("client.test")
            assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            assert client.mail("a@example.org") == (530, b"5.7.0 Authentication required")
            assert client.login("alice@example.test", "tls password")[0] == 235
            assert client.sendmail("a@example.org", ["x@example.net"],
                                   b"Subject: over TLS\r\n\r\nhi\r\n") == {}
        (message,) = sink.wait_messages(1)
        assert re.search(rb"\(Tern\) with ESMTPSA id ", message.content)
        log = server.wait_log("sasl_method=PLAIN, sasl_username=alice@example.test")
        assert "Anonymous TLS connection established from unknown[127.0.0.1]" in log
        assert "tls password" not in log and token not in log
    finally:
        server.stop()


def test_auth_is_offered_on_smtp_only_after_starttls_and_swaks_tls_auth(tmp_path, certs,
                                                                        smtp_sink):
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "bob", "swaks password", scheme="SHA512-CRYPT")
    sink = smtp_sink()
    (tmp_path / "tern").mkdir()
    server = start_with_submission(tmp_path / "tern", certs, sink, passwd)
    try:
        with smtplib.SMTP(*server.address, timeout=10) as client:
            client.ehlo("client.test")
            assert not client.has_extn("auth")
            assert client.docmd("AUTH", "LOGIN") == (
                504, b"5.5.4 Encryption required for requested authentication mechanism")
            client.starttls(context=client_context(certs))
            client.ehlo("client.test")
            assert client.has_extn("auth")
        for port in (server.port, server.submission):
            done = subprocess.run(
                ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--ehlo", "client.test",
                 "--auth", "LOGIN", "--auth-user", "bob", "--auth-password", "swaks password",
                 "--from", "a@example.org", "--to", "x@example.net", "--timeout", "10"],
                capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "<~  235 2.7.0 Authentication successful" in done.stdout
        assert len(sink.wait_messages(2)) == 2
        log = server.wait_log("sasl_method=LOGIN, sasl_username=bob", count=2)
        assert "swaks password" not in log
    finally:
        server.stop()
