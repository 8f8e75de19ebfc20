"""Relay host with AUTH against a second real SMTP server: a throwaway Postfix instance
(bench/postfix_instance.py) whose smtpd offers STARTTLS and, only under TLS, AUTH checked by
Dovecot's auth service over a unix socket (smtpd_sasl_type = dovecot), relaying on to
Postfix's smtp-sink only for authenticated clients. A relaying ``tern serve`` authenticates
with the credentials its smtp_sasl_password_maps holds for the server's host name."""

import base64
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from peers import SmtpSink
from tls_certs import make_certs

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/postfix") or not os.path.exists(DOVECOT),
    reason="a throwaway Postfix instance needs root, Postfix and Dovecot")

USER = "tern-relay"
PASSWORD = "postfix relay secret"

# Dovecot as an authentication server only: no mail protocol, one socket for Postfix's smtpd.
DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = none
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
"""

POSTFIX_SASL = """\
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {socket}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_auth_only = yes
mynetworks = 192.0.2.0/24
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
"""


def _postfix_instance():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from postfix_instance import PostfixInstance
    finally:
        sys.path.pop(0)
    return PostfixInstance


@pytest.fixture(scope="module")
def dovecot_auth():
    """A throwaway Dovecot auth server; yields the path of its unix socket for Postfix."""
    directory = Path(tempfile.mkdtemp(prefix="tern-dovecot-auth-"))
    directory.chmod(0o755)
    (directory / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    conf = directory / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(dir=directory))
    process = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket_path = directory / "run" / "auth-postfix"
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            log = directory / "dovecot.log"
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dovecot auth did not start: "
                                   f"{log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield socket_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix_instance(tmp_path_factory, dovecot_auth):
    """The Postfix relay host (``.port``; ``.sink``: where it relays to), one for the module:
    it takes seconds to start."""
    sink = SmtpSink().start()
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    postfix = _postfix_instance()(sink_port=sink.port, maxproc=2)
    directory = postfix.build()
    settings = POSTFIX_SASL.format(socket=dovecot_auth, cert=certs.default_cert,
                                   key=certs.default_key)
    keys = {line.partition(" =")[0] for line in settings.splitlines()}
    main_cf = directory / "main.cf"
    kept = [line for line in main_cf.read_text().splitlines()
            if line.partition(" =")[0] not in keys]  # replaced, not overridden (no warnings)
    main_cf.write_text("\n".join(kept) + "\n" + settings)
    with (directory / "master.cf").open("a") as master_cf:  # smtpd's TLS needs its tlsmgr
        master_cf.write("tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n")
    postfix.sink = sink
    try:
        postfix.start()
        yield postfix
    finally:
        postfix.stop()
        sink.close()


@pytest.fixture
def postfix_relay(postfix_instance):
    """The module's Postfix, its sink emptied and its log position noted (``.log_start``)."""
    postfix_instance.sink.clear()
    log = postfix_instance.dir / "maillog"
    postfix_instance.log_start = len(log.read_text()) if log.exists() else 0
    return postfix_instance


def relaying(tern, tmp_path, postfix, password, **settings):
    """Tern relaying to the Postfix instance; its credentials are filed under the server's
    host name ("127.0.0.1", Postfix's second lookup after the sender)."""
    table = tmp_path / "sasl_passwd"
    table.write_text(f"127.0.0.1 {USER}:{password}\n")
    return tern(relayhost=f"[127.0.0.1]:{postfix.port}", smtp_tls_security_level="may",
                smtp_sasl_auth_enable=True, smtp_sasl_password_maps=f"texthash:{table}",
                **settings)


def send(server):
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail("sender@example.org", ["rcpt@example.net"],
                        b"Subject: through postfix\r\n\r\nbody\r\n")


def wait_postfix_log(postfix, pattern, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = postfix.dir / "maillog"
        log = path.read_text()[postfix.log_start:] if path.exists() else ""
        if re.search(pattern, log):
            return log
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in Postfix's log:\n{postfix.log_tail(40)}")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_tern_authenticates_to_postfix_after_starttls(tern, tmp_path, postfix_relay, mechanism):
    server = relaying(tern, tmp_path, postfix_relay, PASSWORD,
                      smtp_sasl_mechanism_filter=mechanism.lower())
    send(server)
    (message,) = postfix_relay.sink.wait_messages(1, timeout=30)
    assert message.sender == "sender@example.org"
    log = server.wait_log("status=sent", timeout=30)
    assert f"relay=127.0.0.1[127.0.0.1]:{postfix_relay.port}" in log
    assert f"TLS connection established to 127.0.0.1[127.0.0.1]:{postfix_relay.port}" in log
    postfix_log = wait_postfix_log(
        postfix_relay, rf"client=localhost\[127\.0\.0\.1\], sasl_method={mechanism}, "
        rf"sasl_username={USER}|client=\S+\[127\.0\.0\.1\], sasl_method={mechanism}, "
        rf"sasl_username={USER}")
    for text in (log, postfix_log):
        assert PASSWORD not in text
        assert base64.b64encode(PASSWORD.encode()).decode() not in text


def test_postfix_refusing_the_password_defers_with_its_reply(tern, tmp_path, postfix_relay):
    server = relaying(tern, tmp_path, postfix_relay, "not the password")
    send(server)
    log = server.wait_log("status=deferred", timeout=30)
    assert re.search(r"dsn=4\.7\.8, status=deferred \(SASL authentication failed; server "
                     r"127\.0\.0\.1\[127\.0\.0\.1\] said: 535 5\.7\.8 Error: authentication "
                     r"failed: ", log), log
    wait_postfix_log(postfix_relay, r"SASL PLAIN authentication failed")
    assert "not the password" not in log
    assert postfix_relay.sink.messages() == []
