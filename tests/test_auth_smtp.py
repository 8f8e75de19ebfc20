"""AUTH (RFC 4954) in the sans-I/O SMTP core: PLAIN and LOGIN exchanges fed as bytes, both
reader twins. The application's answer to an Auth request is played by the test."""

import base64

import pytest
from test_smtp_server import Driver

from engine.auth import sasl
from engine.smtp import replies, server

AUTH_ON = {"auth_enabled": True, "tls_auth_only": False}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(authzid: bytes, username: bytes, password: bytes) -> str:
    """An RFC 4616 PLAIN message, base64."""
    return b64(b"\0".join((authzid, username, password)))


PLAIN_ALICE = plain(b"", b"alice", b"secret")


def check_password(event):
    """The application: alice/secret is right, anything else is refused."""
    if isinstance(event, server.Auth):
        ok = event.username == "alice" and event.password == b"secret"
        return None if ok else replies.AUTH_FAILED
    return None


@pytest.fixture
def smtp(impl):
    reader_class = impl("reader").Reader

    def make(tls=False, **settings):
        options = {**AUTH_ON, **settings}
        driver = Driver(reader_class, refuse=check_password, **options)
        driver.session.tls_active = tls
        return driver

    return make


def auth_events(driver):
    return [e for e in driver.events if isinstance(e, server.Auth | server.AuthRefused)]


def test_ehlo_advertises_auth_plain_login_when_offered(smtp):
    lines = smtp().send(b"EHLO c.test\r\n")
    assert "250-AUTH PLAIN LOGIN" in lines


def test_plain_with_initial_response(smtp):
    driver = smtp()
    assert driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode()) == [
        "235 2.7.0 Authentication successful"]
    (event,) = auth_events(driver)
    assert (event.mechanism, event.username, event.password) == ("PLAIN", "alice", b"secret")
    assert driver.session.authenticated


def test_plain_without_initial_response_gets_an_empty_challenge(smtp):
    driver = smtp()
    assert driver.send(b"AUTH PLAIN\r\n") == ["334 "]
    assert driver.session.data_to_send() == b""
    assert driver.send(f"{PLAIN_ALICE}\r\n".encode()) == ["235 2.7.0 Authentication successful"]


def test_plain_empty_challenge_is_334_space(smtp):
    driver = smtp()
    driver.session.receive_data(b"AUTH PLAIN\r\n")
    assert driver.session.next_event() is None
    assert driver.session.data_to_send() == b"334 \r\n"


def test_login_exchange(smtp):
    driver = smtp()
    assert driver.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert driver.send(f"{b64(b'alice')}\r\n".encode()) == ["334 UGFzc3dvcmQ6"]
    assert driver.send(f"{b64(b'secret')}\r\n".encode()) == [
        "235 2.7.0 Authentication successful"]
    (event,) = auth_events(driver)
    assert (event.mechanism, event.username) == ("LOGIN", "alice")


def test_login_initial_response_is_the_user_name(smtp):
    driver = smtp()
    assert driver.send(f"AUTH LOGIN {b64(b'alice')}\r\n".encode()) == ["334 UGFzc3dvcmQ6"]
    assert driver.send(f"{b64(b'wrong')}\r\n".encode()) == [
        "535 5.7.8 Error: authentication failed: authentication failure"]
    assert not driver.session.authenticated


def test_mechanism_name_is_case_insensitive(smtp):
    assert smtp().send(f"auth plain {PLAIN_ALICE}\r\n".encode())[-1].startswith("235 ")


def test_wrong_password_is_535_and_the_session_goes_on(smtp):
    driver = smtp()
    assert driver.send(f"AUTH PLAIN {plain(b'', b'alice', b'nope')}\r\nNOOP\r\n".encode()) == [
        "535 5.7.8 Error: authentication failed: authentication failure", "250 2.0.0 Ok"]
    assert not driver.session.authenticated


def test_star_aborts_the_exchange(smtp):
    driver = smtp()
    driver.send(b"AUTH LOGIN\r\n")
    assert driver.send(b"*\r\n") == ["501 5.7.0 Authentication aborted"]
    (event,) = auth_events(driver)
    assert isinstance(event, server.AuthRefused) and event.reason == "aborted"
    assert driver.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]  # back to commands


@pytest.mark.parametrize("response", [b"not base64!", b"YWJ", b"YW=j", b"\xc3\xa9t\xc3\xa9"])
def test_bad_base64_is_501_cannot_decode(smtp, response):
    driver = smtp()
    driver.send(b"AUTH PLAIN\r\n")
    assert driver.send(response + b"\r\n") == ["501 5.5.2 Cannot decode response"]
    assert driver.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_bad_base64_initial_response(smtp):
    assert smtp().send(b"AUTH PLAIN ***\r\n") == ["501 5.5.2 Cannot decode response"]


@pytest.mark.parametrize("message", [b"alice\0secret", b"\0\0secret", b"\0alice\0",
                                     b"\0alice\0secret\0more", b"\0\xff\0secret"])
def test_malformed_plain_message_fails_without_a_password_check(smtp, message):
    driver = smtp()
    assert driver.send(f"AUTH PLAIN {b64(message)}\r\n".encode()) == [
        "535 5.7.8 Error: authentication failed: authentication failure"]
    (event,) = auth_events(driver)
    assert isinstance(event, server.AuthRefused)


def test_authzid_must_be_empty_or_the_user(smtp):
    driver = smtp()
    line = f"AUTH PLAIN {plain(b'Alice', b'alice', b'secret')}\r\n".encode()
    assert driver.send(line) == ["235 2.7.0 Authentication successful"]
    other = smtp()
    assert other.send(f"AUTH PLAIN {plain(b'bob', b'alice', b'secret')}\r\n".encode()) == [
        "535 5.7.8 Error: authentication failed: authentication failure"]
    (event,) = auth_events(other)
    assert isinstance(event, server.AuthRefused)
    assert event.reason == "authorization identity not allowed"


def test_equals_sign_is_an_empty_response(smtp):
    driver = smtp()
    driver.send(b"AUTH PLAIN\r\n")
    assert driver.send(b"=\r\n") == [
        "535 5.7.8 Error: authentication failed: authentication failure"]


def test_unknown_mechanism(smtp):
    driver = smtp()
    assert driver.send(b"AUTH CRAM-MD5\r\n") == [
        "535 5.7.8 Error: authentication failed: Invalid authentication mechanism"]
    (event,) = auth_events(driver)
    assert isinstance(event, server.AuthRefused) and event.mechanism == "CRAM-MD5"


def test_sasl_responses_are_not_commands(smtp):
    """A continuation line that reads like a command is a response, not a verb."""
    driver = smtp()
    driver.send(b"AUTH LOGIN\r\n")
    assert driver.send(b"MAIL FROM:<a@example.org>\r\n") == ["501 5.5.2 Cannot decode response"]
    assert driver.session.state is server.State.IDLE
    assert driver.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert driver.send(b"QUIT\r\n") == ["334 UGFzc3dvcmQ6"]  # valid base64: a user name
    assert not driver.session.closed
    assert "quit" not in driver.session.command_counts
    assert driver.send(b"*\r\n") == ["501 5.7.0 Authentication aborted"]
    assert driver.session.command_counts == {"auth": 2}


def test_over_long_response_ends_the_exchange(smtp):
    driver = smtp(line_length_limit=512)
    driver.send(b"AUTH PLAIN\r\n")
    assert driver.send(b"A" * 600 + b"\r\n") == ["500 5.5.2 Error: line too long"]
    assert driver.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


@pytest.mark.parametrize("settings, tls, before, reply", [
    ({"auth_enabled": False}, False, b"", "503 5.5.1 Error: authentication not enabled"),
    ({"auth_enabled": False}, True, b"", "503 5.5.1 Error: authentication not enabled"),
    ({"tls_auth_only": True}, False, b"",
     "504 5.5.4 Encryption required for requested authentication mechanism"),
    ({}, False, b"MAIL FROM:<a@example.org>\r\n", "503 5.5.1 Error: MAIL transaction in progress"),
    ({}, False, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nBDAT 2\r\nhi",
     "503 5.5.1 Error: MAIL transaction in progress"),
    ({}, False, f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode(), "503 5.5.1 Error: already authenticated"),
    ({}, False, b"", "501 5.5.4 Syntax: AUTH mechanism"),
])  # fmt: skip
def test_auth_refused_for_its_place(smtp, settings, tls, before, reply):
    driver = smtp(tls=tls, **settings)
    if before:
        driver.send(before)
    command = b"AUTH\r\n" if "Syntax" in reply else f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode()
    assert driver.send(command) == [reply]


def test_not_offered_without_tls_when_tls_auth_only(smtp):
    lines = smtp(tls_auth_only=True).send(b"EHLO c.test\r\n")
    assert not any("AUTH" in line for line in lines)


def test_offered_under_tls_when_tls_auth_only(smtp):
    driver = smtp(tls=True, tls_auth_only=True)
    assert "250-AUTH PLAIN LOGIN" in driver.send(b"EHLO c.test\r\n")
    assert driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode()) == [
        "235 2.7.0 Authentication successful"]


def test_not_offered_when_disabled(smtp):
    assert not any("AUTH" in line for line in smtp(auth_enabled=False).send(b"EHLO c.test\r\n"))


def test_pipelined_commands_wait_for_the_answer():
    """MAIL pipelined after AUTH with an initial response is read only after the AUTH answer,
    so it sees the authenticated session and its reply comes second."""
    session = server.ServerSession(server.Settings(hostname="mx.test", banner="mx.test",
                                                   auth_required=True, **AUTH_ON))
    session.data_to_send()
    session.receive_data(f"AUTH PLAIN {PLAIN_ALICE}\r\nMAIL FROM:<a@example.org>\r\n".encode())
    event = session.next_event()
    assert isinstance(event, server.Auth)
    assert session.next_event() is None  # nothing more until the application answers
    assert session.data_to_send() == b""
    session.accept()
    event = session.next_event()
    assert isinstance(event, server.MailFrom)
    session.accept()
    assert session.data_to_send() == (b"235 2.7.0 Authentication successful\r\n"
                                      b"250 2.1.0 Ok\r\n")


def test_submission_requires_auth_before_mail(smtp):
    driver = smtp(auth_required=True)
    assert driver.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")[-1] == (
        "530 5.7.0 Authentication required")
    assert driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\nMAIL FROM:<a@example.org>\r\n".encode()) == [
        "235 2.7.0 Authentication successful", "250 2.1.0 Ok"]


def test_failed_auth_still_requires_auth(smtp):
    driver = smtp(auth_required=True)
    wrong = plain(b"", b"alice", b"x")
    lines = driver.send(f"AUTH PLAIN {wrong}\r\nMAIL FROM:<a@example.org>\r\n".encode())
    assert lines == ["535 5.7.8 Error: authentication failed: authentication failure",
                     "530 5.7.0 Authentication required"]


def test_rejecting_auth_with_421_closes(smtp):
    driver = smtp()
    driver.refuse = lambda event: replies.too_many_auth_failures("mx.test")
    assert driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\nNOOP\r\n".encode()) == [
        "421 4.7.0 mx.test Error: too many authentication failures"]
    assert driver.session.closed


@pytest.mark.parametrize("param, reply", [
    ("AUTH=<>", "250 2.1.0 Ok"),
    ("AUTH=alice+40example.org", "250 2.1.0 Ok"),
    ("AUTH=<> AUTH=<>", "503 5.5.4 Error: multiple AUTH= options"),
])  # fmt: skip
def test_mail_auth_parameter(smtp, param, reply):
    driver = smtp()
    assert driver.send(f"MAIL FROM:<a@example.org> {param}\r\n".encode()) == [reply]


def test_mail_auth_parameter_is_kept(smtp):
    driver = smtp()
    driver.send(b"MAIL FROM:<a@example.org> AUTH=alice+40example.org\r\n")
    (mail,) = [e for e in driver.events if isinstance(e, server.MailFrom)]
    assert mail.params["AUTH"] == "alice+40example.org"


def test_mail_auth_parameter_when_auth_is_disabled(smtp):
    assert smtp(auth_enabled=False).send(b"MAIL FROM:<a@example.org> AUTH=<>\r\n") == [
        "503 5.5.4 Error: authentication disabled"]


def test_password_is_not_in_the_event_repr():
    event = server.Auth("PLAIN", "alice", b"hunter2")
    assert "hunter2" not in repr(event)
    assert "hunter2" not in repr(sasl.Credentials("alice", b"hunter2"))


def test_rset_and_ehlo_keep_the_authentication(smtp):
    driver = smtp(auth_required=True)
    driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\nRSET\r\nEHLO c.test\r\n".encode())
    assert driver.send(b"MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0 Ok"]


def test_starttls_forgets_an_earlier_auth(smtp):
    """RFC 3207 §4.2: nothing learnt before TLS survives it, an AUTH included (as Postfix)."""
    driver = smtp(auth_required=True, starttls=True)
    assert driver.send(f"EHLO c.test\r\nAUTH PLAIN {PLAIN_ALICE}\r\n".encode())[-1] == (
        "235 2.7.0 Authentication successful")
    assert driver.send(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    driver.session.tls_started()
    assert not driver.session.authenticated
    assert driver.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")[-1] == (
        "530 5.7.0 Authentication required")
    assert driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode()) == [
        "235 2.7.0 Authentication successful"]


def test_security_level_encrypt_wants_starttls_before_auth(smtp):
    driver = smtp(tls_auth_only=True, starttls=True, require_tls=True)
    assert driver.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n".encode()) == [
        "530 5.7.0 Must issue a STARTTLS command first"]


def test_failed_auths_count_towards_the_hard_error_limit(smtp):
    driver = smtp(hard_error_limit=3)
    wrong = f"AUTH PLAIN {plain(b'', b'alice', b'nope')}\r\n".encode()
    assert driver.send(wrong + b"AUTH LOGIN\r\n*\r\n" + wrong) == [
        "535 5.7.8 Error: authentication failed: authentication failure",
        "334 VXNlcm5hbWU6", "501 5.7.0 Authentication aborted",
        "535 5.7.8 Error: authentication failed: authentication failure",
        "421 4.7.0 mx.example.test Error: too many errors"]
    assert driver.session.closed
