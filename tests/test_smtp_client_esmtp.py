"""The sans-I/O client's ESMTP rules: SMTPUTF8 (RFC 6531), CHUNKING/BDAT (RFC 3030) and
Postfix's smtp_discard_ehlo_keywords, fed scripted server bytes (whole and byte at a time)."""

import pytest
from test_smtp_client import BYE, GREETING, PEER, QUEUED, both_feeds, converse, results_of

from engine.smtp.client import Envelope, bdat_chunks, needs_smtputf8

EHLO_CHUNKING = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
)
EHLO_CHUNKING_ONLY = b"250-mx.test\r\n250 CHUNKING\r\n"
EHLO_ASCII = b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
CONTENT = b"Subject: hi\r\n\r\n.dot\r\nbody"
TWO = ["a@y.test", "b@y.test"]


# ---- SMTPUTF8 ----


@pytest.mark.parametrize(
    "sender, recipients, content, needed",
    [
        ("s@x.test", ["a@y.test"], b"Subject: hi\r\n\r\nbody\r\n", False),
        ("s@x.test", ["a@y.test"], b"Subject: hi\r\n\r\ncaf\xc3\xa9\r\n", False),  # body only
        ("s@x.test", ["a@y.test"], b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n", True),
        ("s@x.test", ["a@y.test"], b"Subject: caf\xc3\xa9\n\nbody\n", True),
        ("s@x.test", ["a@y.test"], b"Subject: caf\xc3\xa9", True),  # no body at all
        ("caf\u00e9@x.test", ["a@y.test"], b"Subject: hi\r\n\r\n", True),
        ("s@x.test", ["a@y.test", "\u00e9@y.test"], b"Subject: hi\r\n\r\n", True),
    ],
)
def test_smtputf8_needed_only_for_non_ascii_envelope_or_headers(
    sender, recipients, content, needed
):
    assert needs_smtputf8(Envelope(sender, recipients, content, smtputf8=True)) is needed
    assert needs_smtputf8(Envelope(sender, recipients, content)) is False  # not requested


@both_feeds
def test_smtputf8_message_to_a_server_without_it_bounces_without_mail(bytewise):
    envelope = Envelope("s@x.test", ["\u00e9@y.test", "b@y.test"], CONTENT, smtputf8=True)
    writes, events, _ = converse([GREETING, EHLO_ASCII, BYE], envelope, bytewise=bytewise)
    assert writes == [b"EHLO client.example\r\n", b"QUIT\r\n"]
    text = f"SMTPUTF8 is required, but was not offered by host {PEER}"
    assert results_of(events) == [
        ("\u00e9@y.test", "bounced", "5.6.7", text),
        ("b@y.test", "bounced", "5.6.7", text),
    ]


def test_smtputf8_requested_but_all_ascii_goes_without_the_parameter():
    envelope = Envelope("s@x.test", ["a@y.test"], b"Subject: hi\r\n\r\n", smtputf8=True)
    tail = [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", QUEUED, BYE]
    writes, events, _ = converse([GREETING, EHLO_ASCII, *tail], envelope)
    assert writes[1].startswith(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y.test>\r\n")
    assert results_of(events)[0][1] == "sent"


def test_smtputf8_parameter_and_utf8_addresses_to_a_server_that_offers_it():
    envelope = Envelope(
        "caf\u00e9@x.test", ["\u00e9@y.test"], b"Subject: hi\r\n\r\n", smtputf8=True
    )
    ehlo = b"250-mx.test\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n"
    tail = [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", QUEUED, BYE]
    writes, events, _ = converse([GREETING, ehlo, *tail], envelope)
    assert writes[1] == (
        "MAIL FROM:<caf\u00e9@x.test> SMTPUTF8\r\nRCPT TO:<\u00e9@y.test>\r\nDATA\r\n".encode()
    )
    assert results_of(events)[0][1] == "sent"


# ---- BDAT ----


@pytest.mark.parametrize(
    "content, size, chunks",
    [
        (b"", 10, [b"BDAT 0 LAST\r\n"]),
        (b"abc", 10, [b"BDAT 5 LAST\r\nabc\r\n"]),
        (b".a\nb\n", 10, [b"BDAT 7 LAST\r\n.a\r\nb\r\n"]),  # CRLF, but no dot-stuffing
        (b"abcdef\r\n", 4, [b"BDAT 4\r\nabcd", b"BDAT 4 LAST\r\nef\r\n"]),
        (b"abcdef\r\n", 3, [b"BDAT 3\r\nabc", b"BDAT 3\r\ndef", b"BDAT 2 LAST\r\n\r\n"]),
    ],
)
def test_bdat_chunks(content, size, chunks):
    assert bdat_chunks(content, size) == chunks


@both_feeds
def test_chunking_with_pipelining_sends_the_chunks_after_the_rcpt_replies(bytewise):
    envelope = Envelope("s@x.test", TWO, CONTENT)
    script = [
        GREETING,
        EHLO_CHUNKING,
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 User unknown\r\n",
        b"250 2.0.0 Ok: 8 bytes\r\n",
        QUEUED,
        BYE,
    ]
    writes, events, _ = converse(script, envelope, bytewise=bytewise, chunk_size=16)
    assert writes == [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\n",
        # back to back before any reply (pipelined), one write each: never joined in memory
        b"BDAT 16\r\nSubject: hi\r\n\r\n.", b"BDAT 11 LAST\r\ndot\r\nbody\r\n",
        b"QUIT\r\n",
    ]
    assert results_of(events) == [
        ("a@y.test", "sent", "2.0.0", "250 2.0.0 Ok: queued as 4Xyz"),
        (
            "b@y.test",
            "bounced",
            "5.1.1",
            f"host {PEER} said: 550 5.1.1 User unknown (in reply to RCPT TO command)",
        ),
    ]


def test_chunking_without_pipelining_one_chunk_a_reply():
    envelope = Envelope("s@x.test", ["a@y.test"], CONTENT)
    script = [
        GREETING,
        EHLO_CHUNKING_ONLY,
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"250 2.0.0 16 bytes\r\n",
        QUEUED,
        BYE,
    ]
    writes, events, _ = converse(script, envelope, chunk_size=16)
    assert writes == [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<s@x.test>\r\n",
        b"RCPT TO:<a@y.test>\r\n",
        b"BDAT 16\r\nSubject: hi\r\n\r\n.",
        b"BDAT 11 LAST\r\ndot\r\nbody\r\n",
        b"QUIT\r\n",
    ]
    assert results_of(events)[0][:2] == ("a@y.test", "sent")


def test_chunking_failed_chunk_stops_the_rest_and_decides_the_message():
    envelope = Envelope("s@x.test", ["a@y.test"], CONTENT)
    script = [
        GREETING,
        EHLO_CHUNKING_ONLY,
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"452 4.3.1 Insufficient system storage\r\n",
        BYE,
    ]
    writes, events, _ = converse(script, envelope, chunk_size=16)
    assert writes[3:] == [b"BDAT 16\r\nSubject: hi\r\n\r\n.", b"QUIT\r\n"]
    assert results_of(events) == [
        (
            "a@y.test",
            "deferred",
            "4.3.1",
            f"host {PEER} said: 452 4.3.1 Insufficient system storage"
            " (in reply to BDAT command)",
        )
    ]


def test_chunking_pipelined_first_failure_wins_over_the_last_reply():
    envelope = Envelope("s@x.test", ["a@y.test"], CONTENT)
    script = [
        GREETING,
        EHLO_CHUNKING,
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        b"554 5.6.0 bad chunk\r\n503 5.5.1 Error: bad sequence\r\n",
        BYE,
    ]
    _, events, _ = converse(script, envelope, chunk_size=16)
    assert results_of(events)[0][1:3] == ("bounced", "5.6.0")


def test_chunking_no_recipient_accepted_sends_no_chunk():
    envelope = Envelope("s@x.test", TWO, CONTENT)
    script = [
        GREETING,
        EHLO_CHUNKING,
        b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n450 4.2.0 Later\r\n",
        BYE,
    ]
    writes, events, _ = converse(script, envelope)
    assert writes[2:] == [b"QUIT\r\n"]
    assert [r[1] for r in results_of(events)] == ["bounced", "deferred"]


def test_chunking_mail_refused_pipelined_consumes_rcpt_replies_sends_no_chunk():
    envelope = Envelope("s@x.test", TWO, CONTENT)
    script = [
        GREETING,
        EHLO_CHUNKING,
        b"553 5.7.1 Sender rejected\r\n" + b"503 5.5.1 Error: need MAIL command\r\n" * 2,
        BYE,
    ]
    writes, events, _ = converse(script, envelope)
    assert writes[2:] == [b"QUIT\r\n"]
    assert {r[2] for r in results_of(events)} == {"5.7.1"}


def test_discarded_chunking_keyword_sends_data():
    envelope = Envelope("s@x.test", ["a@y.test"], CONTENT)
    script = [GREETING, EHLO_CHUNKING, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", QUEUED, BYE]
    writes, events, client = converse(
        script, envelope, discard_ehlo_keywords=("chunking", "Pipelining")
    )
    assert "CHUNKING" not in client.extensions and "PIPELINING" not in client.extensions
    assert writes[1] == b"MAIL FROM:<s@x.test>\r\n"
    writes, events, _ = converse(script, envelope, discard_ehlo_keywords=("chunking",))
    assert writes[1].endswith(b"DATA\r\n")
    assert writes[2] == b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"
    assert results_of(events)[0][1] == "sent"
