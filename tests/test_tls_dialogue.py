"""STARTTLS in the sans-I/O SMTP dialogue (RFC 3207), fed bytes with both reader twins: what is
offered when, Postfix's replies, and what is forgotten on 220 (CVE-2011-0411)."""

import pytest
from test_smtp_server import Driver

from engine.smtp import server

TLS = {"starttls": True}


@pytest.fixture
def smtp(impl):
    reader_class = impl("reader").Reader

    def make(**settings):
        return Driver(reader_class, **settings)

    return make


def keywords(lines):
    return [line[4:] for line in lines[1:]]


def handshake(driver):
    """What the adapter does after ``220 Ready to start TLS``: the handshake succeeded."""
    driver.session.tls_started()


def test_starttls_is_offered_only_when_configured(smtp):
    assert "STARTTLS" not in keywords(smtp().send(b"EHLO client.test\r\n"))
    assert "STARTTLS" in keywords(smtp(**TLS).send(b"EHLO client.test\r\n"))


def test_starttls_is_not_offered_once_tls_is_active(smtp):
    driver = smtp(**TLS)
    driver.send(b"EHLO client.test\r\nSTARTTLS\r\n")
    handshake(driver)
    assert "STARTTLS" not in keywords(driver.send(b"EHLO client.test\r\n"))


@pytest.mark.parametrize("line, settings, reply", [
    (b"STARTTLS now\r\n", TLS, "501 5.5.4 Syntax: STARTTLS"),
    (b"STARTTLS\r\n", {}, "502 5.5.1 Error: command not implemented"),
])
def test_starttls_refusals(smtp, line, settings, reply):
    driver = smtp(**settings)
    assert driver.send(line) == [reply]
    assert not any(isinstance(event, server.StartTls) for event in driver.events)


def test_starttls_twice_is_554(smtp):
    driver = smtp(**TLS)
    assert driver.send(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    handshake(driver)
    assert driver.send(b"STARTTLS\r\n") == ["554 5.5.1 Error: TLS already active"]


def test_starttls_is_a_request_answered_with_220(smtp):
    driver = smtp(**TLS)
    assert driver.send(b"EHLO client.test\r\nSTARTTLS\r\n")[-1] == "220 2.0.0 Ready to start TLS"
    assert isinstance(driver.events[-1], server.StartTls)


def test_plaintext_pipelined_behind_starttls_is_discarded(smtp):
    driver = smtp(**TLS)
    lines = driver.send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<evil@example.org>\r\n"
                        b"RCPT TO:<victim@example.net>\r\n")
    assert lines[-1] == "220 2.0.0 Ready to start TLS"
    assert not any(line.startswith(("250 2.1", "503", "530")) for line in lines)
    handshake(driver)
    assert driver.pump() == []  # nothing left over to answer after the handshake
    assert driver.send(b"EHLO client.test\r\nRCPT TO:<b@example.net>\r\n")[-1] == (
        "503 5.5.1 Error: need MAIL command")
    assert not any(isinstance(event, server.MailFrom | server.RcptTo) for event in driver.events)


def test_plaintext_split_across_packets_is_discarded_too(smtp):
    driver = smtp(**TLS)
    driver.session.receive_data(b"EHLO client.test\r\nSTART")
    driver.pump()
    driver.session.receive_data(b"TLS\r\nMAIL FROM:<evil@exa")
    assert driver.pump() == ["220 2.0.0 Ready to start TLS"]
    handshake(driver)
    driver.session.receive_data(b"NOOP\r\n")  # a fresh line under TLS, not "mple.org>..."
    assert driver.pump() == ["250 2.0.0 Ok"]


def test_starttls_forgets_helo_and_the_transaction(smtp):
    driver = smtp(**TLS)
    driver.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                b"STARTTLS\r\n")
    assert isinstance(driver.events[-1], server.Reset)  # the adapter drops its transaction
    handshake(driver)
    assert driver.session.helo_name is None and not driver.session.extended
    assert driver.send(b"MAIL FROM:<a@example.org>\r\n") == [
        "503 5.5.1 Error: send HELO/EHLO first"]
    assert driver.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")[-1] == (
        "250 2.1.0 Ok")


@pytest.mark.parametrize("xclient", [b"XCLIENT ADDR=192.0.2.7 HELO=c.example PROTO=ESMTP",
                                     b"XCLIENT ADDR=192.0.2.7"])
def test_xclient_under_tls_starts_afresh_without_a_new_ehlo(smtp, xclient):
    """XCLIENT after STARTTLS is a new start under TLS (the greeting again), not plaintext
    state carried over: MAIL needs no EHLO more than after a fresh connection."""
    driver = smtp(**TLS)
    driver.session.xclient_allowed = True
    driver.send(b"EHLO proxy.test\r\nSTARTTLS\r\n")
    handshake(driver)
    assert driver.send(xclient + b"\r\n") == ["220 mx.example.test ESMTP Tern"]
    assert driver.send(b"MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0 Ok"]


def test_mail_without_helo_is_accepted_when_no_starttls_happened(smtp):
    """HELO stays optional, as in Postfix: only a STARTTLS makes the client say EHLO again."""
    assert smtp(**TLS).send(b"MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0 Ok"]


def test_encrypt_level_refuses_mail_before_tls(smtp):
    driver = smtp(starttls=True, require_tls=True)
    assert driver.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")[-1] == (
        "530 5.7.0 Must issue a STARTTLS command first")
    assert driver.session.tls_refusal() is not None
    driver.send(b"STARTTLS\r\n")
    handshake(driver)
    assert driver.session.tls_refusal() is None
    assert driver.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")[-1] == (
        "250 2.1.0 Ok")


@pytest.mark.parametrize("line", [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>",
                                  b"DATA", b"VRFY postmaster", b"HELP", b"AUTH PLAIN"])
def test_encrypt_level_answers_530_to_every_command_not_allowed_before_tls(smtp, line):
    driver = smtp(starttls=True, require_tls=True)
    assert driver.send(b"EHLO client.test\r\n" + line + b"\r\n")[-1] == (
        "530 5.7.0 Must issue a STARTTLS command first")
    assert driver.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]  # the commands Postfix allows


def test_implicit_tls_session_takes_mail_at_once(smtp):
    """smtps: the adapter calls tls_started() before the greeting; no EHLO is owed."""
    driver = smtp(require_tls=True)
    handshake(driver)
    assert driver.send(b"MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0 Ok"]
    assert driver.send(b"STARTTLS\r\n") == ["554 5.5.1 Error: TLS already active"]
