"""The client core's AUTH stage (RFC 4954, PLAIN and LOGIN) and the SASL choices behind it, fed
scripted server bytes (whole and one byte at a time), without I/O."""

import base64

import pytest

from engine.smtp.client import (
    Client,
    Closed,
    Envelope,
    NeedData,
    Ready,
    Send,
    SessionFailed,
    StartTls,
    TransactionDone,
)
from engine.smtp.sasl_client import SaslLogin, allows_plaintext, choose, offered

PEER = "relay.test[127.0.0.1]"
GREETING = b"220 relay.test ESMTP\r\n"
EHLO_TLS = b"250-relay.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_AUTH = b"250-relay.test\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
EHLO_BARE = b"250-relay.test\r\n250 8BITMIME\r\n"
ENVELOPE = Envelope("s@x.test", ["a@y.test"], b"Subject: hi\r\n\r\nbody\r\n")
DELIVERY = [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", b"250 2.0.0 Ok: queued\r\n",
            b"221 Bye\r\n"]
LOGIN = SaslLogin("relay-user", "s3cret pass")
PLAIN_TOKEN = base64.b64encode(b"\0relay-user\0s3cret pass")


def converse(script, *, bytewise=False, **options):
    """Run a client against the scripted chunks; StartTls "succeeds" at once. Returns (writes,
    events, client)."""
    client = Client("client.example", peer=PEER, relay=PEER + ":587", **options)
    pending = b"".join(script)
    chunks = iter(script)
    writes, events = [], []
    while True:
        match event := client.next_event():
            case Send(data=data):
                writes.append(data)
            case NeedData():
                if bytewise:
                    client.receive_data(pending[:1])
                    pending = pending[1:]
                else:
                    client.receive_data(next(chunks, b""))
            case StartTls():
                client.tls_started()
            case Ready():
                events.append(event)
                client.start_transaction(ENVELOPE)
            case TransactionDone() | SessionFailed():
                events.append(event)
                if isinstance(event, TransactionDone):
                    client.quit()
            case Closed():
                return writes, events, client


both_feeds = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


@both_feeds
def test_plain_after_starttls_with_initial_response_then_mail(bytewise):
    script = [GREETING, EHLO_TLS, b"220 go ahead\r\n", EHLO_AUTH,
              b"235 2.7.0 Authentication successful\r\n", *DELIVERY]
    writes, events, client = converse(script, bytewise=bytewise, starttls="may", sasl=LOGIN)
    assert writes[:4] == [b"EHLO client.example\r\n", b"STARTTLS\r\n", b"EHLO client.example\r\n",
                          b"AUTH PLAIN " + PLAIN_TOKEN + b"\r\n"]
    assert writes[4].startswith(b"MAIL FROM:<s@x.test>")  # after 235, not before
    assert [type(e) for e in events] == [Ready, TransactionDone]
    assert events[1].results[0].status == "sent"
    assert client.sasl_mechanism == "PLAIN"


def test_login_answers_each_challenge_in_turn():
    script = [GREETING, EHLO_TLS, b"220 go\r\n", EHLO_AUTH, b"334 VXNlcm5hbWU6\r\n",
              b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 Authentication successful\r\n", *DELIVERY]
    login = SaslLogin("relay-user", "s3cret pass", mechanism_filter=("LOGIN",))
    writes, events, client = converse(script, starttls="may", sasl=login)
    assert writes[3:6] == [b"AUTH LOGIN\r\n", base64.b64encode(b"relay-user") + b"\r\n",
                           base64.b64encode(b"s3cret pass") + b"\r\n"]
    assert isinstance(events[0], Ready) and client.sasl_mechanism == "LOGIN"


def test_refused_auth_defers_with_the_servers_reply_as_postfix():
    script = [GREETING, EHLO_TLS, b"220 go\r\n", EHLO_AUTH,
              b"535 5.7.8 Error: authentication failed: bad password\r\n", b"221 Bye\r\n"]
    writes, events, client = converse(script, starttls="may", sasl=LOGIN)
    (failed,) = events
    assert isinstance(failed, SessionFailed) and not failed.permanent
    assert failed.dsn == "4.7.8"  # smtp_sasl_auth_soft_bounce = yes: 5xx becomes 4xx
    assert failed.text == ("SASL authentication failed; server relay.test[127.0.0.1] said: "
                           "535 5.7.8 Error: authentication failed: bad password")
    assert writes[-1] == b"QUIT\r\n" and not any(w.startswith(b"MAIL") for w in writes)
    assert client.sasl_mechanism is None


def test_refused_auth_bounces_without_soft_bounce():
    script = [GREETING, EHLO_TLS, b"220 go\r\n", EHLO_AUTH, b"535 5.7.8 no\r\n", b"221 Bye\r\n"]
    _, (failed,), _ = converse(script, starttls="may", sasl=LOGIN, sasl_soft_bounce=False)
    assert failed.dsn == "5.7.8" and failed.permanent


def test_temporary_auth_failure_defers():
    script = [GREETING, EHLO_TLS, b"220 go\r\n", EHLO_AUTH,
              b"454 4.7.0 Temporary authentication failure\r\n", b"221 Bye\r\n"]
    _, (failed,), _ = converse(script, starttls="may", sasl=LOGIN, sasl_soft_bounce=False)
    assert failed.dsn == "4.7.0" and not failed.permanent
    assert "said: 454 4.7.0 Temporary authentication failure" in failed.text


def test_no_plaintext_auth_without_tls_by_default():
    """The server offers AUTH but no STARTTLS: PLAIN/LOGIN would send the password in clear,
    so the session ends as Postfix's "no mechanism available" (deferred, 4.7.0)."""
    writes, (failed,), _ = converse([GREETING, EHLO_AUTH, b"221 Bye\r\n"], starttls="may",
                                    sasl=LOGIN)
    assert failed.dsn == "4.7.0"
    assert failed.text == ("SASL authentication failed; cannot authenticate to server "
                           "relay.test[127.0.0.1]: no mechanism available")
    assert writes == [b"EHLO client.example\r\n", b"QUIT\r\n"]


def test_plaintext_auth_when_the_security_options_allow_it():
    login = SaslLogin("relay-user", "s3cret pass", plaintext=True)
    writes, events, _ = converse([GREETING, EHLO_AUTH, b"235 2.7.0 Ok\r\n", *DELIVERY],
                                 sasl=login)
    assert writes[1] == b"AUTH PLAIN " + PLAIN_TOKEN + b"\r\n"
    assert events[-1].results[0].status == "sent"


def test_no_auth_under_tls_when_the_tls_security_options_forbid_it():
    login = SaslLogin("u", "p", under_tls=False)
    _, (failed,), _ = converse([GREETING, EHLO_TLS, b"220 go\r\n", EHLO_AUTH, b"221 Bye\r\n"],
                               starttls="may", sasl=login)
    assert "no mechanism available" in failed.text


def test_server_without_auth_gets_mail_without_it():
    writes, events, client = converse([GREETING, EHLO_BARE, *DELIVERY], sasl=LOGIN)
    assert not any(w.startswith(b"AUTH") for w in writes)
    assert events[-1].results[0].status == "sent" and client.sasl_warning is None


def test_mechanism_filter_leaving_nothing_goes_on_without_auth_and_warns():
    ehlo = b"250-relay.test\r\n250 AUTH CRAM-MD5 PLAIN\r\n"
    login = SaslLogin("u", "p", mechanism_filter=("LOGIN",), plaintext=True)
    writes, events, client = converse([GREETING, ehlo, *DELIVERY], sasl=login)
    assert not any(w.startswith(b"AUTH") for w in writes)
    assert events[-1].results[0].status == "sent"
    assert client.sasl_warning == ("relay.test[127.0.0.1] offered no supported AUTH "
                                   "mechanisms: 'CRAM-MD5 PLAIN'")


def test_only_unknown_mechanisms_defers():
    ehlo = b"250-relay.test\r\n250 AUTH CRAM-MD5 DIGEST-MD5\r\n"
    _, (failed,), _ = converse([GREETING, ehlo, b"221 Bye\r\n"],
                               sasl=SaslLogin("u", "p", plaintext=True))
    assert "no mechanism available" in failed.text


def test_a_third_challenge_is_cancelled_then_the_session_fails():
    script = [GREETING, EHLO_AUTH, b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n",
              b"334 more?\r\n", b"501 5.7.0 cancelled\r\n", b"221 Bye\r\n"]
    login = SaslLogin("u", "p", mechanism_filter=("LOGIN",), plaintext=True)
    writes, (failed,), _ = converse(script, sasl=login)
    assert writes[-2:] == [b"*\r\n", b"QUIT\r\n"]
    assert failed.text.endswith("said: 501 5.7.0 cancelled")


def test_421_during_auth_ends_the_session():
    script = [GREETING, EHLO_AUTH, b"421 4.7.0 closing\r\n"]
    writes, (failed,), _ = converse(script, sasl=SaslLogin("u", "p", plaintext=True))
    assert failed.dsn == "4.7.0" and "(in reply to AUTH command)" in failed.text
    assert writes[-1].startswith(b"AUTH PLAIN")  # no QUIT after 421


def test_the_plaintext_ehlo_list_is_not_used_after_starttls():
    """AUTH offered only before STARTTLS (a downgrade trick): after TLS the new EHLO has none,
    so no AUTH is sent."""
    ehlo = b"250-relay.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"
    writes, events, _ = converse([GREETING, ehlo, b"220 go\r\n", EHLO_BARE, *DELIVERY],
                                 starttls="may", sasl=LOGIN)
    assert not any(w.startswith(b"AUTH") for w in writes)
    assert events[-1].results[0].status == "sent"


def test_sasl_choices():
    assert offered({"AUTH": "login plain", "AUTH=LOGIN": ""}) == ["LOGIN", "PLAIN"]
    assert offered({"AUTH=PLAIN": "LOGIN"}) == ["PLAIN", "LOGIN"]
    assert offered({"SIZE": "10"}) == []
    assert choose(SaslLogin("u", "p"), ["CRAM-MD5", "LOGIN", "PLAIN"], True) == "LOGIN"
    assert choose(SaslLogin("u", "p"), ["PLAIN"], False) is None
    assert allows_plaintext(["noanonymous"]) and allows_plaintext([])
    for option in ("noplaintext", "noactive", "nodictionary", "mutual_auth"):
        assert not allows_plaintext(["noanonymous", option.upper()])
    assert "s3cret" not in repr(LOGIN)
