"""Relay host with AUTH, end to end: a relaying ``tern serve`` (relayhost, smtp_sasl_*) sends
through another ``tern serve``'s submission listener (STARTTLS, then AUTH PLAIN or LOGIN, a
passwd-file made with engine.auth), which relays on to Postfix's smtp-sink. Wrong passwords
defer with the server's reply, no password ever goes in clear by default, and no log holds
one. Also sender_dependent_relayhost_maps sending two senders' mail to two sinks."""

import base64
import re
import smtplib

import pytest
from peers import free_port
from tern_process import TernServer
from tls_certs import make_certs

from engine.auth.passwd_file import set_password
from engine.auth.schemes import make_hash

USER = "relay-user@example.test"
PASSWORD = "correct horse battery"
SECRETS = (PASSWORD, "wrong staple", base64.b64encode(PASSWORD.encode()).decode(),
           base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
           base64.b64encode(f"\0{USER}\0wrong staple".encode()).decode())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def servers(tmp_path):
    """Factory of TernServers (stopped at teardown); ``submission=True`` adds a submission
    [[listen]] (``server.submission``, its port)."""
    started = []

    def make(settings, *, submission=False):
        directory = tmp_path / f"tern{len(started)}"
        directory.mkdir()
        server = TernServer(directory, settings)
        if submission:
            server.submission = free_port()
            with server.config_file.open("a") as config:
                config.write(f'[[listen]]\naddress = "127.0.0.1:{server.submission}"\n'
                             'service = "submission"\n')
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def upstream(servers, tmp_path, sink, certs=None, **settings):
    """The relay host: a Tern whose submission listener takes mail only after AUTH (its
    mynetworks holds no loopback address) and sends it on to ``sink``."""
    passwd = tmp_path / "passwd"
    set_password(passwd, USER, make_hash("SHA512-CRYPT", PASSWORD.encode()))
    tls = {"smtpd_tls_cert_file": str(certs.default_cert),
           "smtpd_tls_key_file": str(certs.default_key)} if certs else {}
    return servers({"smtpd_sasl_password_file": str(passwd), "mynetworks": "192.0.2.0/24",
                    "relayhost": sink.nexthop, **tls, **settings}, submission=True)


def relaying(servers, tmp_path, relay, password=PASSWORD, table="sasl_passwd", **settings):
    """The Tern under test: relayhost = the upstream's submission port, credentials in a
    texthash table under the next hop as relayhost writes it."""
    nexthop = f"[127.0.0.1]:{relay.submission}"
    table = tmp_path / table
    table.write_text(f"# relay credentials\n{nexthop} {USER}:{password}\n")
    table.chmod(0o600)
    return servers({"relayhost": nexthop, "smtp_tls_security_level": "may",
                    "smtp_sasl_auth_enable": True,
                    "smtp_sasl_password_maps": f"texthash:{table}", **settings})


def send(server, sender="sender@example.org", rcpt="rcpt@example.net", subject="relayed"):
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail(sender, [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def assert_no_secret(*servers):
    for server in servers:
        log = server.log()
        for secret in SECRETS:
            assert secret not in log, server.maillog


def test_starttls_then_auth_plain_through_terns_submission(servers, tmp_path, certs, smtp_sink):
    sink = smtp_sink()
    relay = upstream(servers, tmp_path, sink, certs)
    server = relaying(servers, tmp_path, relay)
    send(server)
    (message,) = sink.wait_messages(1, timeout=20)
    assert message.recipients == ("rcpt@example.net",)
    assert b"with ESMTPSA id" in message.content  # the relay host saw TLS and AUTH
    log = server.wait_log("status=sent")
    assert f"relay=127.0.0.1[127.0.0.1]:{relay.submission}" in log
    assert "TLS connection established to 127.0.0.1[127.0.0.1]" in log
    relay_log = relay.wait_log(f"sasl_method=PLAIN, sasl_username={USER}")
    assert "Anonymous TLS connection established from" in relay_log
    assert_no_secret(server, relay)


def test_login_via_the_mechanism_filter(servers, tmp_path, certs, smtp_sink):
    sink = smtp_sink()
    relay = upstream(servers, tmp_path, sink, certs)
    server = relaying(servers, tmp_path, relay, smtp_sasl_mechanism_filter="login")
    send(server)
    assert len(sink.wait_messages(1, timeout=20)) == 1
    server.wait_log("status=sent")
    relay.wait_log(f"sasl_method=LOGIN, sasl_username={USER}")
    assert_no_secret(server, relay)


def test_a_wrong_password_defers_with_the_servers_reply(servers, tmp_path, certs, smtp_sink):
    sink = smtp_sink()
    relay = upstream(servers, tmp_path, sink, certs)
    server = relaying(servers, tmp_path, relay, password="wrong staple")
    send(server)
    log = server.wait_log("status=deferred")
    assert ("dsn=4.7.8, status=deferred (SASL authentication failed; server "
            "127.0.0.1[127.0.0.1] said: 535 5.7.8 Error: authentication failed: "
            "authentication failure)") in log
    relay.wait_log("SASL PLAIN authentication failed")
    # smtp_sasl_auth_soft_bounce = no: the 535 bounces the mail instead
    hard = relaying(servers, tmp_path, relay, password="wrong staple", table="sasl_passwd2",
                    smtp_sasl_auth_soft_bounce=False)
    send(hard)
    log = hard.wait_log("status=bounced")
    assert ("dsn=5.7.8, status=bounced (SASL authentication failed; server 127.0.0.1[127.0.0.1]"
            " said: 535 5.7.8 Error: authentication failed: authentication failure)") in log
    assert sink.messages() == []
    assert_no_secret(server, hard, relay)


def test_no_password_in_clear_without_tls_unless_allowed(servers, tmp_path, smtp_sink):
    """The relay host offers AUTH but no STARTTLS (no certificate, smtpd_tls_auth_only off):
    the default security options keep PLAIN and LOGIN off a plaintext session, so nothing is
    sent and the mail waits, as Postfix's "no mechanism available"; with
    smtp_sasl_security_options = noanonymous (Postfix's README's opt-in) it goes."""
    sink = smtp_sink()
    relay = upstream(servers, tmp_path, sink, smtpd_tls_auth_only=False)
    server = relaying(servers, tmp_path, relay)
    send(server)
    log = server.wait_log("status=deferred")
    assert ("dsn=4.7.0, status=deferred (SASL authentication failed; cannot authenticate to "
            "server 127.0.0.1[127.0.0.1]: no mechanism available)") in log
    # the relay host's session with it: EHLO and QUIT, no AUTH command at all
    relay.wait_log("disconnect from unknown[127.0.0.1] ehlo=1 quit=1 commands=2")
    assert "sasl_method" not in relay.log() and "auth=" not in relay.log()

    allowed = relaying(servers, tmp_path, relay, table="sasl_passwd2",
                       smtp_sasl_security_options="noanonymous")
    send(allowed)
    assert len(sink.wait_messages(1, timeout=20)) == 1
    allowed.wait_log("status=sent")
    relay.wait_log(f"sasl_method=PLAIN, sasl_username={USER}")
    assert_no_secret(server, allowed, relay)


def test_sender_dependent_relayhost_routes_two_senders_to_two_sinks(servers, smtp_sink,
                                                                      tmp_path):
    first, second, default = smtp_sink(), smtp_sink(), smtp_sink()
    directory = tmp_path / "routed"
    directory.mkdir()
    server = TernServer(directory, {"relayhost": default.nexthop})
    with server.config_file.open("a") as config:
        config.write("[sender_dependent_relayhost_maps]\n"
                     f'"alice@one.example" = "{first.nexthop}"\n'
                     f'"@two.example" = "{second.nexthop}"\n'
                     f'"<>" = "{second.nexthop}"\n')
    server.start()
    try:
        send(server, "alice@one.example", subject="from alice")
        send(server, "bob@two.example", subject="from bob")
        send(server, "carol@one.example", subject="from carol")  # only alice is listed
        send(server, "", subject="a bounce")
        (alice,) = first.wait_messages(1, timeout=20)
        bob, bounce = second.wait_messages(2, timeout=20)
        (carol,) = default.wait_messages(1, timeout=20)
    finally:
        server.stop()
    assert alice.sender == "alice@one.example"
    assert {bob.sender, bounce.sender} == {"bob@two.example", ""}
    assert carol.sender == "carol@one.example"


def test_sender_dependent_credentials_never_share_a_cached_session(servers, tmp_path, certs,
                                                                   smtp_sink):
    """smtp_sender_dependent_authentication: each sender's mail goes with its own login
    (address, then @domain, then the next hop's), and a session cached after one login is
    reused only for mail of the same login (conn_use=2), never another's."""
    sink = smtp_sink()
    relay = upstream(servers, tmp_path, sink, certs)
    passwd = tmp_path / "passwd"
    for user in ("alice-user", "bob-user"):
        set_password(passwd, user, make_hash("SHA512-CRYPT", f"{user} pw".encode()))
    table = tmp_path / "sasl_passwd"
    table.write_text(f"alice@one.example alice-user:alice-user pw\n"
                     f"@two.example bob-user:bob-user pw\n"
                     f"[127.0.0.1]:{relay.submission} {USER}:{PASSWORD}\n")
    server = servers({"relayhost": f"[127.0.0.1]:{relay.submission}", "worker_count": 1,
                      "smtp_tls_security_level": "may", "smtp_sasl_auth_enable": True,
                      "smtp_sender_dependent_authentication": True,
                      "smtp_sasl_password_maps": f"texthash:{table}"})
    senders = ["alice@one.example", "bob@two.example", "alice@one.example",
               "carol@three.example", "bob@two.example"]
    for count, sender in enumerate(senders, 1):
        send(server, sender)
        server.wait_log("status=sent", count=count)
    assert len(sink.wait_messages(len(senders), timeout=20)) == len(senders)
    relay_log = relay.wait_log("sasl_username=", count=len(senders))
    logins = dict(re.findall(r": (\w+): client=\S+, sasl_method=PLAIN, sasl_username=(\S+)\n",
                             relay_log))
    sent_by = re.findall(r": (\w+): from=<([^>]*)>", relay_log)
    assert sorted((sender, logins[queue_id]) for queue_id, sender in sent_by) == [
        ("alice@one.example", "alice-user"), ("alice@one.example", "alice-user"),
        ("bob@two.example", "bob-user"), ("bob@two.example", "bob-user"),
        ("carol@three.example", USER)]
    # the second message of alice and of bob each rode on their own cached session
    assert server.log().count("conn_use=2") == 2
