"""AUTH end to end: ``tern passwd`` writes the entries a running ``tern serve`` checks, a
password change takes effect without a restart, and the maillog never holds a password."""

import base64
import smtplib
import subprocess
import sys

import pytest
from tern_process import REPO


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
