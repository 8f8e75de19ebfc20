"""The client core's STARTTLS stage (RFC 3207) and the pure TLS policy rules, without I/O."""

import pytest

from engine.config import Config
from engine.delivery import NextHop
from engine.delivery.route import nexthop_as_written
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
from engine.tls.client import PolicyFinder
from engine.tls.policy import (
    PolicyError,
    TlsPolicy,
    name_matches,
    parse_policy,
    policy_lookup_keys,
    wanted_names,
)

PEER = "mx.test[127.0.0.1]"
GREETING = b"220 mx.test ESMTP\r\n"
EHLO_TLS = b"250-mx.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_AFTER = b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_NO_TLS = b"250-mx.test\r\n250 8BITMIME\r\n"
ENVELOPE = Envelope("s@x.test", ["a@y.test"], b"Subject: hi\r\n\r\nbody\r\n")


def converse(script, **options):
    """Scripted server chunks; on StartTls the "handshake" succeeds at once. Returns (writes,
    events, client)."""
    client = Client("client.example", peer=PEER, relay=PEER + ":25", **options)
    chunks = iter(script)
    writes, events = [], []
    while True:
        match event := client.next_event():
            case Send(data=data):
                writes.append(data)
            case NeedData():
                client.receive_data(next(chunks, b""))
            case StartTls():
                events.append(event)
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


DELIVERY = [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go\r\n", b"250 2.0.0 Ok\r\n",
            b"221 Bye\r\n"]


@pytest.mark.parametrize("mode", ["may", "require"])
def test_starttls_then_a_new_ehlo_whose_extensions_replace_the_old(mode):
    script = [GREETING, EHLO_TLS, b"220 2.0.0 Ready to start TLS\r\n", EHLO_AFTER, *DELIVERY]
    writes, events, client = converse(script, starttls=mode)
    assert writes[:4] == [b"EHLO client.example\r\n", b"STARTTLS\r\n",
                          b"EHLO client.example\r\n", b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y.test>"
                          b"\r\nDATA\r\n"]
    assert isinstance(events[0], StartTls)
    assert events[1] == Ready(True, {"PIPELINING": "", "8BITMIME": ""})
    assert client.tls_active
    assert events[2].results[0].status == "sent"


def test_bytes_behind_the_220_are_thrown_away():
    """A man in the middle appends a fake EHLO reply to the 220 (CVE-2011-0411, client side):
    the client must not take it as the answer to the EHLO it sends under TLS."""
    injected = b"220 2.0.0 Ready to start TLS\r\n250-evil\r\n250 AUTH PLAIN\r\n"
    writes, events, _ = converse([GREETING, EHLO_TLS, injected, EHLO_AFTER, *DELIVERY],
                                 starttls="may")
    assert events[1] == Ready(True, {"PIPELINING": "", "8BITMIME": ""})


@pytest.mark.parametrize(("reply", "pending"), [
    (b"220 2.0.0 Ready to start TLS\r\n", False),
    (b"220 2.0.0 Ready to start TLS\r\n250 forged\r\n", True),
    (b"220 2.0.0 Ready to start TLS\r\n25", True),  # even a partial line
])
def test_pending_input_tells_the_adapter_of_bytes_behind_the_220(reply, pending):
    """What the adapter checks before the handshake (it then refuses the session)."""
    client = Client("client.example", peer=PEER, relay=PEER + ":25", starttls="require")
    for chunk in (GREETING, EHLO_TLS, reply):
        while not isinstance(client.next_event(), NeedData | StartTls):
            pass
        client.receive_data(chunk)
    assert isinstance(client.next_event(), StartTls)
    assert client.pending_input is pending


def test_none_never_sends_starttls():
    writes, events, client = converse([GREETING, EHLO_TLS, b"250 2.1.0 Ok\r\n",
                                       b"250 2.1.5 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"])
    assert b"STARTTLS\r\n" not in writes and not client.tls_active


def test_may_without_starttls_goes_on_in_plaintext():
    writes, events, _ = converse([GREETING, EHLO_NO_TLS, b"250 2.1.0 Ok\r\n",
                                  b"250 2.1.5 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"],
                                 starttls="may")
    assert b"STARTTLS\r\n" not in writes and writes[1].startswith(b"MAIL FROM")
    assert events[-1].results[0].status == "sent"


def test_may_with_starttls_refused_goes_on_in_plaintext():
    writes, events, client = converse(
        [GREETING, EHLO_TLS, b"454 4.7.0 TLS not available\r\n", b"250 2.1.0 Ok\r\n",
         b"250 2.1.5 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"], starttls="may")
    assert writes[1] == b"STARTTLS\r\n" and writes[2].startswith(b"MAIL FROM")
    assert not client.tls_active and events[-1].results[0].status == "sent"


def test_require_without_starttls_fails_with_postfix_text():
    writes, events, _ = converse([GREETING, EHLO_NO_TLS, b"221 Bye\r\n"], starttls="require")
    assert writes == [b"EHLO client.example\r\n", b"QUIT\r\n"]
    assert events == [
        SessionFailed("4.7.4", f"TLS is required, but was not offered by host {PEER}")]


def test_require_after_helo_fallback_fails():
    writes, events, _ = converse([GREETING, b"502 5.5.2 no\r\n", b"250 mx.test\r\n",
                                  b"221 Bye\r\n"], starttls="require")
    assert writes[-1] == b"QUIT\r\n" and events[0].dsn == "4.7.4"


def test_require_with_starttls_refused_fails():
    writes, events, _ = converse([GREETING, EHLO_TLS, b"454 4.7.0 TLS not available\r\n",
                                  b"221 Bye\r\n"], starttls="require")
    assert events[0].dsn == "4.7.0"
    assert events[0].text == (f"TLS is required, but host {PEER} refused to start TLS:"
                              " 454 4.7.0 TLS not available")


def test_wrapper_mode_session_sends_no_starttls():
    writes, _, client = converse([GREETING, EHLO_TLS, *DELIVERY[:4]], starttls="none",
                                 tls_active=True)
    assert b"STARTTLS\r\n" not in writes and client.tls_active


# ---- policies ----


@pytest.mark.parametrize("text, policy", [
    ("encrypt", TlsPolicy("encrypt")),
    ("NONE", TlsPolicy("none")),
    ("secure", TlsPolicy("secure", ("nexthop", "dot-nexthop"))),
    ("secure match=.example.com:example.com", TlsPolicy("secure", (".example.com", "example.com"))),
    ("verify", TlsPolicy("verify", ("hostname",))),
    ("verify match=hostname:Mail.Example.com",
     TlsPolicy("verify", ("hostname", "mail.example.com"))),
    ("fingerprint match=AB:CD:EF|01:02", TlsPolicy("fingerprint", ("abcdef", "0102"))),
])
def test_policy_syntax_as_postfix(text, policy):
    assert parse_policy(text) == policy


@pytest.mark.parametrize("text, fragment", [
    ("tlsa", "unsupported TLS security level 'tlsa'"),
    ("encrypt ciphers=high", "unsupported policy attribute 'ciphers=high'"),
    ("fingerprint", "fingerprint level needs match="),
    ("", "empty policy"),
])
def test_bad_policies_are_refused(text, fragment):
    with pytest.raises(PolicyError, match=fragment):
        parse_policy(text)


def test_lookup_keys_walk_up_the_parent_domains():
    assert policy_lookup_keys("mx.Example.COM.") == ["mx.example.com", ".example.com", ".com"]


def test_lookup_keys_of_a_next_hop_in_brackets_or_with_a_port_are_only_itself():
    assert policy_lookup_keys("[Relay.Example.com]:587") == ["[relay.example.com]:587"]
    assert policy_lookup_keys("[relay.example.com]") == ["[relay.example.com]"]
    assert policy_lookup_keys("example.com:2525") == ["example.com:2525"]
    assert policy_lookup_keys("[ipv6:2001:db8::1]") == ["[ipv6:2001:db8::1]"]


def test_policy_table_keys_are_next_hops_as_postfix_writes_them(tmp_path):
    """smtp_tls_policy_maps (texthash) looked up with route.nexthop_as_written, as Postfix."""
    table = tmp_path / "tls_policy"
    table.write_text("[relay.example.com]:587 secure match=relay.example.com\n"
                     "relay.example.com encrypt\n"
                     ".example.com may\n"
                     "[mx.example.net] verify\n")
    finder = PolicyFinder(Config(smtp_tls_policy_maps=f"texthash:{table}"))

    def level(host, port, mx):
        return finder.policy(nexthop_as_written(NextHop("smtp", host, port, mx))).level

    assert level("relay.example.com", 587, False) == "secure"  # relayhost = [relay…]:587
    assert level("relay.example.com", 25, False) == "none"  # [relay.example.com]: no entry
    assert level("relay.example.com", 25, True) == "encrypt"  # the domain itself
    assert level("other.example.com", 25, True) == "may"  # a parent domain
    assert level("other.example.com", 2525, True) == "none"  # with a port: only as written
    assert level("mx.example.net", 25, False) == "verify"


@pytest.mark.parametrize("name, pattern, matches", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "example.com", False),
    ("mx.example.com", ".example.com", True),
    ("example.com", ".example.com", False),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.mx.example.com", False),
    ("*.example.com", ".example.com", True),
    # a wildcard needs two labels after it (OpenSSL's rule): "*.com" covers nothing
    ("*.com", "example.com", False),
    ("*.com", ".com", False),
    ("*.", "example", False),
])
def test_certificate_name_matching(name, pattern, matches):
    assert name_matches(name, pattern) is matches


def test_strategy_words_expand():
    policy = TlsPolicy("secure", ("hostname", "nexthop", "dot-nexthop", "other.test"))
    assert wanted_names(policy, "MX1.example.com.", "[example.com]") == [
        "mx1.example.com", "example.com", ".example.com", "other.test"]
