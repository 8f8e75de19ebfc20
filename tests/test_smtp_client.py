"""The sans-I/O SMTP client core, fed server bytes (whole and one byte at a time)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.smtp import client as client_module
from engine.smtp.client import (
    Client,
    Closed,
    Envelope,
    LocalProtocolError,
    NeedData,
    Ready,
    RemoteProtocolError,
    Reply,
    ReplyBuffer,
    ReuseFailed,
    Send,
    SessionFailed,
    Stage,
    TransactionDone,
    dot_stuff,
)
from engine.smtp.reader import Reader

PEER = "mx.test[127.0.0.1]"
RELAY = "mx.test[127.0.0.1]:25"
GREETING = b"220 mx.test ESMTP\r\n"
EHLO_PIPELINING = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
CONTENT = b"Subject: hi\r\n\r\nbody\r\n"
ENVELOPE = Envelope("s@x.test", ["a@y.test", "b@y.test", "c@y.test"], CONTENT)
QUEUED = b"250 2.0.0 Ok: queued as 4Xyz\r\n"
BYE = b"221 2.0.0 Bye\r\n"


def converse(script, envelope=ENVELOPE, *, bytewise=False, timeout_at=None, **options):
    """Run a client against scripted server bytes: each NeedData takes the next chunk (or the
    next byte); an exhausted script is EOF. ``timeout_at``: the stage whose read times out.
    Returns (each write, the non-I/O events, the client)."""
    client = Client("client.example", peer=PEER, relay=RELAY, **options)
    pending = b"".join(script) if bytewise else None
    chunks = iter(script)
    writes, events = [], []
    while True:
        event = client.next_event()
        match event:
            case Send(data=data):
                writes.append(data)
            case NeedData(stage=stage) if stage == timeout_at:
                client.timed_out()
            case NeedData():
                if bytewise:
                    client.receive_data(pending[:1])
                    pending = pending[1:]
                else:
                    client.receive_data(next(chunks, b""))
            case Ready():
                events.append(event)
                client.start_transaction(envelope)
            case TransactionDone():
                events.append(event)
                client.quit()
            case SessionFailed():
                events.append(event)
            case Closed():
                return writes, events, client


def results_of(events):
    (done,) = [e for e in events if isinstance(e, TransactionDone)]
    return [(r.recipient, r.status, r.dsn, r.reply) for r in done.results]


both_feeds = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


# ---- replies ----


@both_feeds
def test_ehlo_multiline_reply_gives_extensions(bytewise):
    _, events, client = converse([GREETING, EHLO_PIPELINING, b"221 Bye\r\n"], bytewise=bytewise)
    ready = events[0]
    assert isinstance(ready, Ready) and ready.esmtp
    assert ready.extensions == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "8BITMIME": "",
        "ENHANCEDSTATUSCODES": "",
    }
    assert client.size_limit == 10240000


@pytest.fixture
def reply_buffer(impl, monkeypatch):
    """ReplyBuffer splitting lines with each twin of the server's input reader
    (engine.speedups.Reader, compiled and pure): the same cases, the same results."""
    monkeypatch.setattr(client_module, "Reader", impl("reader").Reader)
    return ReplyBuffer


def test_reply_buffer_bare_lf_and_trailing_data(reply_buffer):
    buf = reply_buffer()
    buf.feed(b"250-first\n250 last\r\n354 go")
    assert buf.read_reply() == Reply(250, "first\nlast")
    assert buf.read_reply() is None
    buf.feed(b" ahead\r\n")
    assert buf.read_reply() == Reply(354, "go ahead")


def test_reply_buffer_byte_at_a_time(reply_buffer):
    data = b"220 mx.test ESMTP\r\n" + EHLO_PIPELINING + b"250 2.0.0 Ok\n"
    buf = reply_buffer()
    replies = []
    for i in range(len(data)):
        buf.feed(data[i : i + 1])
        while (reply := buf.read_reply()) is not None:
            replies.append(reply)
    assert [r.code for r in replies] == [220, 250, 250]
    assert replies[1].lines == (
        "mx.test", "PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"
    )


def test_reply_buffer_bare_code_line(reply_buffer):
    buf = reply_buffer()
    buf.feed(b"250\r\n")
    assert buf.read_reply() == Reply(250, "")


@pytest.mark.parametrize("line", [b"hello\r\n", b"25\r\n", b"250x\r\n", b"650 no\r\n"])
def test_reply_buffer_rejects_malformed_lines(reply_buffer, line):
    buf = reply_buffer()
    buf.feed(line)
    with pytest.raises(RemoteProtocolError):
        buf.read_reply()


def test_reply_buffer_caps_reply_size(reply_buffer):
    buf = reply_buffer(max_size=100)
    buf.feed(b"250-" + b"x" * 60 + b"\r\n")
    assert buf.read_reply() is None
    buf.feed(b"250-" + b"x" * 60 + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="reply too long"):
        buf.read_reply()


def test_reply_buffer_cap_counts_the_unfinished_line(reply_buffer):
    buf = reply_buffer(max_size=100)
    buf.feed(b"250-" + b"x" * 60 + b"\r\n250 " + b"y" * 40)
    with pytest.raises(RemoteProtocolError, match="reply too long"):
        buf.read_reply()


@pytest.mark.parametrize("end", [b"\r\n", b""], ids=["complete", "unfinished"])
def test_reply_buffer_one_line_over_the_cap(reply_buffer, end):
    buf = reply_buffer(max_size=100)
    buf.feed(b"250 " + b"x" * 200 + end)
    with pytest.raises(RemoteProtocolError, match="reply too long"):
        buf.read_reply()


def test_reply_buffer_exactly_at_the_cap(reply_buffer):
    buf = reply_buffer(max_size=100)
    buf.feed(b"250 " + b"x" * 94 + b"\r\n")  # 100 bytes with its CRLF
    assert buf.read_reply() == Reply(250, "x" * 94)


def test_malformed_reply_ends_session_like_a_lost_connection():
    writes, events, _ = converse([b"SSH-2.0-OpenSSH\r\n"])
    assert writes == []
    assert events == [
        SessionFailed(
            "4.4.2", f"{PEER} sent a malformed reply (malformed reply line b'SSH-2.0-OpenSSH')"
        )
    ]


def test_multiline_reply_text_is_logged_as_postfix_does():
    reply = Reply(550, "5.1.1 first\n5.1.1 second")
    assert reply.flat == "550-5.1.1 first 550 5.1.1 second"
    assert Reply(250, "").flat == "250"


@pytest.mark.parametrize(
    ("code", "text", "dsn"),
    [
        (250, "2.0.0 Ok: queued as X", "2.0.0"),
        (550, "5.1.1 <a@y.test>: User unknown", "5.1.1"),
        (450, "4.7.25 Client host rejected", "4.7.25"),
        (550, "4.1.1 class disagrees with the code", "5.1.1"),
        (550, "User unknown", "5.0.0"),
        (451, "Try later", "4.0.0"),
        (250, "Ok", "2.0.0"),
        (550, "5.1.1x not a status code", "5.0.0"),
        (554, "", "5.0.0"),
        (354, "End data", "4.0.0"),
    ],
)
def test_enhanced_status_code_from_reply_or_derived(code, text, dsn):
    assert Reply(code, text).dsn == dsn


# ---- greeting and EHLO/HELO ----


def test_helo_fallback_when_ehlo_refused_with_5xx():
    script = [
        GREETING,
        b"502 5.5.2 Error: command not recognized\r\n",
        b"250 mx.test\r\n",
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"354 go\r\n",
        QUEUED,
        BYE,
    ]
    envelope = Envelope("s@x.test", ENVELOPE.recipients, CONTENT, body_8bit=True)
    writes, events, _ = converse(script, envelope)
    assert writes[:3] == [
        b"EHLO client.example\r\n",
        b"HELO client.example\r\n",
        b"MAIL FROM:<s@x.test>\r\n",
    ]  # no ESMTP parameters after HELO
    assert events[0] == Ready(esmtp=False, extensions={})


def test_greeting_refused_fails_session_and_quits():
    writes, events, _ = converse([b"554 5.7.1 No SMTP service here\r\n", BYE])
    assert writes == [b"QUIT\r\n"]
    assert events == [
        SessionFailed(
            "5.7.1",
            f"host {PEER} refused to talk to me: 554 5.7.1 No SMTP service here",
            Reply(554, "5.7.1 No SMTP service here"),
        )
    ]


def test_421_greeting_fails_session_without_quit():
    writes, events, _ = converse([b"421 4.3.2 Service shutting down\r\n"])
    assert writes == []
    assert events[0].dsn == "4.3.2"


def test_ehlo_4xx_fails_session():
    writes, events, _ = converse([GREETING, b"450 4.7.1 go away\r\n", BYE])
    assert writes == [b"EHLO client.example\r\n", b"QUIT\r\n"]
    assert events[0].text == (f"host {PEER} said: 450 4.7.1 go away (in reply to EHLO command)")


def test_lost_connection_during_greeting():
    writes, events, _ = converse([])
    assert writes == []
    assert events == [
        SessionFailed(
            "4.4.2", f"lost connection with {PEER} while receiving the initial server greeting"
        )
    ]


def test_helo_name_must_be_one_word():
    with pytest.raises(LocalProtocolError):
        Client("bad name\r\nRCPT")


# ---- pipelining and per-recipient results ----

RCPT_MIX = (
    b"250 2.1.5 Ok\r\n"
    b"450 4.2.0 <b@y.test>: Recipient address rejected: Greylisted\r\n"
    b"550 5.1.1 <c@y.test>: Recipient address rejected: User unknown\r\n"
)


@both_feeds
def test_pipelining_sends_mail_rcpts_and_data_in_one_write(bytewise):
    script = [
        GREETING,
        EHLO_PIPELINING,
        b"250 2.1.0 Ok\r\n" + RCPT_MIX + b"354 go\r\n",
        QUEUED,
        BYE,
    ]
    writes, events, _ = converse(script, bytewise=bytewise)
    assert writes == [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<s@x.test> SIZE=21\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\n"
        b"RCPT TO:<c@y.test>\r\nDATA\r\n",
        CONTENT + b".\r\n",
        b"QUIT\r\n",
    ]
    assert results_of(events) == [
        ("a@y.test", "sent", "2.0.0", "250 2.0.0 Ok: queued as 4Xyz"),
        (
            "b@y.test",
            "deferred",
            "4.2.0",
            f"host {PEER} said: 450 4.2.0 <b@y.test>: Recipient "
            "address rejected: Greylisted (in reply to RCPT TO command)",
        ),
        (
            "c@y.test",
            "bounced",
            "5.1.1",
            f"host {PEER} said: 550 5.1.1 <c@y.test>: Recipient "
            "address rejected: User unknown (in reply to RCPT TO command)",
        ),
    ]
    assert all(r.relay == RELAY for r in events[-1].results)


@both_feeds
def test_without_pipelining_one_command_per_reply(bytewise):
    script = [
        GREETING,
        EHLO_PLAIN,
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"450 4.2.0 Greylisted\r\n",
        b"550 5.1.1 User unknown\r\n",
        b"354 go\r\n",
        QUEUED,
        BYE,
    ]
    writes, events, _ = converse(script, bytewise=bytewise)
    assert writes == [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<s@x.test>\r\n",
        b"RCPT TO:<a@y.test>\r\n",
        b"RCPT TO:<b@y.test>\r\n",
        b"RCPT TO:<c@y.test>\r\n",
        b"DATA\r\n",
        CONTENT + b".\r\n",
        b"QUIT\r\n",
    ]
    assert [r[1] for r in results_of(events)] == ["sent", "deferred", "bounced"]


def test_pipelining_can_be_turned_off():
    script = (
        [GREETING, EHLO_PIPELINING, b"250 2.1.0 Ok\r\n"]
        + [b"250 2.1.5 Ok\r\n"] * 3
        + [b"354 go\r\n", QUEUED, BYE]
    )
    writes, _, _ = converse(script, pipelining=False)
    assert writes[1] == b"MAIL FROM:<s@x.test> SIZE=21\r\n"


def test_mail_parameters_body_8bitmime_only_when_offered():
    envelope = Envelope("", ["a@y.test"], b"caf\xc3\xa9\r\n", body_8bit=True)
    tail = [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", QUEUED, BYE]
    writes, _, _ = converse([GREETING, EHLO_PIPELINING, *tail], envelope)
    assert writes[1].startswith(b"MAIL FROM:<> SIZE=7 BODY=8BITMIME\r\n")
    no_8bit = b"250-mx.test\r\n250 PIPELINING\r\n"
    writes, _, _ = converse([GREETING, no_8bit, *tail], envelope)
    assert writes[1].startswith(b"MAIL FROM:<>\r\nRCPT")


DSN_ENVELOPE = Envelope(
    "s@x.test",
    ["a@y.test", "b@y.test", "c@y.test"],
    CONTENT,
    ret="HDRS",
    envid="Q+2Bid",
    notify={"a@y.test": "SUCCESS,FAILURE,DELAY", "b@y.test": "NEVER", "c@y.test": ""},
    orcpt={"a@y.test": "rfc822;A+2Bx@y.test", "c@y.test": "rfc822;c@y.test"},
)
EHLO_DSN = b"250-mx.test\r\n250-PIPELINING\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n"
ALL_SENT = [b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 3 + b"354 go\r\n", QUEUED, BYE]


@both_feeds
def test_dsn_parameters_passed_on_when_offered(bytewise):
    """RFC 3461 §5.2.1: RET/ENVID on MAIL, NOTIFY/ORCPT on each RCPT, as stored; a recipient
    without them (no entry or "") gets none."""
    writes, events, _ = converse([GREETING, EHLO_DSN, *ALL_SENT], DSN_ENVELOPE, bytewise=bytewise)
    assert writes[1] == (
        b"MAIL FROM:<s@x.test> RET=HDRS ENVID=Q+2Bid\r\n"
        b"RCPT TO:<a@y.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;A+2Bx@y.test\r\n"
        b"RCPT TO:<b@y.test> NOTIFY=NEVER\r\n"
        b"RCPT TO:<c@y.test> ORCPT=rfc822;c@y.test\r\n"
        b"DATA\r\n"
    )
    (done,) = [e for e in events if isinstance(e, TransactionDone)]
    assert done.dsn_passed


def test_dsn_parameters_without_pipelining_and_after_size_and_body():
    envelope = Envelope(
        "", ["a@y.test"], CONTENT, body_8bit=True, ret="FULL", notify={"a@y.test": "FAILURE"}
    )
    ehlo = b"250-mx.test\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 DSN\r\n"
    script = [GREETING, ehlo, b"250 Ok\r\n", b"250 Ok\r\n", b"354 go\r\n", QUEUED, BYE]
    writes, events, _ = converse(script, envelope)
    assert writes[1:3] == [
        b"MAIL FROM:<> SIZE=21 BODY=8BITMIME RET=FULL\r\n",
        b"RCPT TO:<a@y.test> NOTIFY=FAILURE\r\n",
    ]
    assert events[-1].dsn_passed


@pytest.mark.parametrize(
    "script",
    [
        [GREETING, EHLO_PIPELINING, *ALL_SENT],
        [GREETING, EHLO_PLAIN, *[b"250 Ok\r\n"] * 4, b"354 go\r\n", QUEUED, BYE],
    ],
    ids=["pipelining", "one-by-one"],
)
def test_dsn_parameters_not_sent_when_not_offered(script):
    """Never an unadvertised parameter: without DSN the request stays here (dsn_passed False,
    the queue manager owes the "relayed" notice)."""
    writes, events, _ = converse(script, DSN_ENVELOPE)
    sent = b"".join(writes)
    for word in (b"RET=", b"ENVID=", b"NOTIFY=", b"ORCPT="):
        assert word not in sent
    assert b"RCPT TO:<a@y.test>\r\n" in sent
    assert [r[1] for r in results_of(events)] == ["sent"] * 3
    (done,) = [e for e in events if isinstance(e, TransactionDone)]
    assert not done.dsn_passed


def test_dsn_not_passed_when_helo_fallback():
    script = [GREETING, b"502 5.5.2 Error\r\n", b"250 mx.test\r\n", b"250 Ok\r\n"]
    script += [b"250 Ok\r\n"] * 3 + [b"354 go\r\n", QUEUED, BYE]
    writes, events, _ = converse(script, DSN_ENVELOPE)
    assert writes[2] == b"MAIL FROM:<s@x.test>\r\n"
    assert not events[-1].dsn_passed


def test_dsn_not_passed_when_size_limit_bounces_before_mail():
    envelope = Envelope("s@x.test", ["a@y.test"], b"x" * 100, ret="FULL")
    ehlo = b"250-mx.test\r\n250-DSN\r\n250 SIZE 50\r\n"
    writes, events, _ = converse([GREETING, ehlo, BYE], envelope)
    assert writes == [b"EHLO client.example\r\n", b"QUIT\r\n"]
    assert not events[-1].dsn_passed


@pytest.mark.parametrize(
    "fields",
    [
        {"ret": "FULL\r\nRSET"},
        {"envid": "a b"},
        {"envid": "a=b"},
        {"notify": {"a@y.test": "NEVER\r\nRCPT TO:<x@z.test>"}},
        {"orcpt": {"a@y.test": "rfc822;\u00e9@y.test"}},
    ],
)
def test_unsafe_dsn_values_are_refused(fields):
    client = Client("client.example")
    client.receive_data(GREETING + EHLO_DSN)
    while not isinstance(client.next_event(), Ready):
        pass
    with pytest.raises(LocalProtocolError):
        client.start_transaction(Envelope("s@x.test", ["a@y.test"], b"", **fields))


def test_message_over_the_servers_size_limit_bounces_without_mail():
    envelope = Envelope("s@x.test", ["a@y.test"], b"x" * 100)
    ehlo = b"250-mx.test\r\n250 SIZE 50\r\n"
    writes, events, _ = converse([GREETING, ehlo, BYE], envelope)
    assert writes == [b"EHLO client.example\r\n", b"QUIT\r\n"]
    assert results_of(events) == [
        ("a@y.test", "bounced", "5.3.4", f"message size 100 exceeds size limit 50 of server {PEER}")
    ]


def test_mail_from_rejected_with_pipelining_applies_to_all_and_consumes_replies():
    replies = (
        b"553 5.7.1 <s@x.test>: Sender address rejected\r\n"
        + b"503 5.5.1 Error: need MAIL command\r\n" * 3
        + b"503 5.5.1 Error: need RCPT command\r\n"
    )
    writes, events, _ = converse([GREETING, EHLO_PIPELINING, replies, BYE])
    assert writes[-1] == b"QUIT\r\n" and len(writes) == 3
    text = (
        f"host {PEER} said: 553 5.7.1 <s@x.test>: Sender address rejected "
        "(in reply to MAIL FROM command)"
    )
    assert results_of(events) == [(r, "bounced", "5.7.1", text) for r in ENVELOPE.recipients]


def test_mail_from_deferred_without_pipelining_sends_no_rcpt():
    writes, events, _ = converse([GREETING, EHLO_PLAIN, b"451 4.3.0 Try later\r\n", BYE])
    assert writes == [b"EHLO client.example\r\n", b"MAIL FROM:<s@x.test>\r\n", b"QUIT\r\n"]
    assert {r[1] for r in results_of(events)} == {"deferred"}


def test_no_recipient_accepted_without_pipelining_sends_no_data():
    script = [GREETING, EHLO_PLAIN, b"250 2.1.0 Ok\r\n"] + [b"550 5.1.1 unknown\r\n"] * 3 + [BYE]
    writes, events, _ = converse(script)
    assert b"DATA\r\n" not in writes
    assert {r[1] for r in results_of(events)} == {"bounced"}


def test_no_recipient_accepted_but_354_sends_empty_message():
    """RFC 2920 §3.1: a server may answer 354 after rejecting every RCPT; end it with "."."""
    replies = b"250 2.1.0 Ok\r\n" + b"550 5.1.1 unknown\r\n" * 3 + b"354 go\r\n"
    script = [GREETING, EHLO_PIPELINING, replies, b"554 5.5.1 Error: no valid recipients\r\n", BYE]
    writes, events, _ = converse(script)
    assert writes[2] == b".\r\n"
    assert {r[1] for r in results_of(events)} == {"bounced"}
    assert all("RCPT TO" in r[3] for r in results_of(events))


def test_data_refused_applies_to_accepted_recipients_only():
    replies = b"250 2.1.0 Ok\r\n" + RCPT_MIX + b"554 5.5.1 Error: no thanks\r\n"
    writes, events, _ = converse([GREETING, EHLO_PIPELINING, replies, BYE])
    assert len(writes) == 3  # EHLO, the pipelined batch, QUIT: no content
    results = results_of(events)
    said = f"host {PEER} said: 554 5.5.1 Error: no thanks (in reply to DATA command)"
    assert results[0] == ("a@y.test", "bounced", "5.5.1", said)
    assert [r[1] for r in results[1:]] == ["deferred", "bounced"]


@pytest.mark.parametrize(
    ("final", "status", "dsn"),
    [
        (b"451 4.3.0 Queue file write error\r\n", "deferred", "4.3.0"),
        (b"554 5.7.1 Message rejected: spam\r\n", "bounced", "5.7.1"),
        (b"550 Rejected\r\n", "bounced", "5.0.0"),
    ],
)
def test_reply_after_dot_decides_accepted_recipients(final, status, dsn):
    replies = b"250 2.1.0 Ok\r\n" + RCPT_MIX + b"354 go\r\n"
    _, events, _ = converse([GREETING, EHLO_PIPELINING, replies, final, BYE])
    results = results_of(events)
    assert results[0][1:3] == (status, dsn)
    assert results[0][3].endswith("(in reply to end of DATA command)")
    assert [r[1] for r in results[1:]] == ["deferred", "bounced"]  # the RCPT replies stand


def test_lost_connection_after_rcpt_defers_open_recipients():
    replies = b"250 2.1.0 Ok\r\n" + RCPT_MIX
    _, events, _ = converse([GREETING, EHLO_PIPELINING, replies])
    results = results_of(events)
    assert results[0] == (
        "a@y.test",
        "deferred",
        "4.4.2",
        f"lost connection with {PEER} while sending DATA command",
    )
    assert [r[1] for r in results[1:]] == ["deferred", "bounced"]


def next_mx_of(events):
    (done,) = [e for e in events if isinstance(e, TransactionDone)]
    return {r.recipient: r.next_mx for r in done.results if r.status == "deferred"}


def test_a_session_lost_before_the_content_lets_another_mx_take_the_recipients():
    """Lost before 354 (nothing of the message sent): the open recipients may go to the next
    MX host (the one the server deferred with 450 goes there by its own "host ... said")."""
    _, events, _ = converse([GREETING, EHLO_PIPELINING, b"250 2.1.0 Ok\r\n" + RCPT_MIX])
    assert next_mx_of(events) == {"a@y.test": True, "b@y.test": False}


@pytest.mark.parametrize("stage", [Stage.BODY, Stage.DOT])
def test_a_session_lost_once_the_content_went_keeps_the_recipients(stage):
    """From the body on, the end of data may have reached the server: no other MX host gets
    the recipients in this delivery (a duplicate otherwise)."""
    replies = b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 3 + b"354 go\r\n"
    _, events, _ = converse([GREETING, EHLO_PIPELINING, replies], timeout_at=stage)
    assert set(next_mx_of(events).values()) == {False}


def test_timeout_after_dot_says_message_may_be_sent_twice():
    replies = b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 3 + b"354 go\r\n"
    writes, events, _ = converse([GREETING, EHLO_PIPELINING, replies], timeout_at=Stage.DOT)
    assert writes[-1] == CONTENT + b".\r\n"  # no QUIT on a dead connection
    assert {r[3] for r in results_of(events)} == {
        f"conversation with {PEER} timed out while sending end of data -- message may be sent"
        " more than once"
    }


def test_421_mid_transaction_defers_open_recipients_and_closes():
    replies = b"250 2.1.0 Ok\r\n550 5.1.1 unknown\r\n421 4.4.2 mx.test Error: timeout\r\n"
    writes, events, _ = converse([GREETING, EHLO_PIPELINING, replies])
    assert writes[-1].endswith(b"DATA\r\n")  # no QUIT after 421
    results = results_of(events)
    assert [r[1:3] for r in results] == [
        ("bounced", "5.1.1"),
        ("deferred", "4.4.2"),
        ("deferred", "4.4.2"),
    ]
    assert results[1][3].endswith("(in reply to RCPT TO command)")


def test_unsafe_addresses_are_refused():
    client = Client("client.example")
    client.receive_data(GREETING + EHLO_PLAIN)
    while not isinstance(client.next_event(), Ready):
        pass
    with pytest.raises(LocalProtocolError):
        client.start_transaction(Envelope("s@x.test", ["a@y.test>\r\nRCPT TO:<b@y.test"], b""))


# ---- a second transaction on the same connection (reuse) ----


def next_io(client):
    """Pump events until the client needs data, returning the writes and other events."""
    writes, events = [], []
    while True:
        event = client.next_event()
        if isinstance(event, Send):
            writes.append(event.data)
        elif isinstance(event, NeedData | Closed):
            return writes, events
        else:
            events.append(event)
            if isinstance(event, Ready | TransactionDone | ReuseFailed):
                return writes, events


ONE = Envelope("s@x.test", ["a@y.test"], CONTENT)


def after_one_transaction(ehlo=EHLO_PIPELINING):
    """A client whose first transaction went through, ready for the next (a reused session)."""
    client = Client("client.example", peer=PEER, relay=RELAY)
    client.receive_data(GREETING + ehlo)
    next_io(client)
    client.start_transaction(ONE)
    client.receive_data(b"250 Ok\r\n250 Ok\r\n354 go\r\n" + QUEUED)
    _, events = next_io(client)
    assert isinstance(events[-1], TransactionDone)
    assert client.transactions == 1
    return client


def second_transaction(replies, *, timeout_at=None, ehlo=EHLO_PIPELINING):
    """Run a second transaction of ONE against ``replies`` (chunks; exhausted = EOF), quitting
    after TransactionDone. Returns (the writes, the non-I/O events, the client)."""
    client = after_one_transaction(ehlo)
    client.start_transaction(ONE)
    chunks = iter(replies)
    writes, events = [], []
    while True:
        match client.next_event():
            case Send(data=data):
                writes.append(data)
            case NeedData(stage=stage) if stage == timeout_at:
                client.timed_out()
            case NeedData():
                client.receive_data(next(chunks, b""))
            case TransactionDone() as event:
                events.append(event)
                client.quit()
            case Closed():
                return writes, events, client
            case event:
                events.append(event)


def test_second_transaction_after_clean_one_starts_with_rset():
    writes, events, client = second_transaction(
        [b"250 2.0.0 Ok\r\n", b"250 Ok\r\n250 Ok\r\n354 go\r\n", QUEUED, BYE],
        ehlo=EHLO_PLAIN,
    )
    assert writes[:3] == [b"RSET\r\n", b"MAIL FROM:<s@x.test>\r\n", b"RCPT TO:<a@y.test>\r\n"]
    assert writes[-1] == b"QUIT\r\n"
    assert results_of(events) == [("a@y.test", "sent", "2.0.0", QUEUED.decode().strip())]
    assert client.transactions == 2


@pytest.mark.parametrize(
    ("replies", "timeout_at", "text", "quits"),
    [
        ([], None, f"lost connection with {PEER} while sending RSET", False),
        ([], Stage.RSET, f"conversation with {PEER} timed out while sending RSET", False),
        (
            [b"421 4.4.2 mx.test Error: timeout exceeded\r\n"],
            None,
            f"host {PEER} said: 421 4.4.2 mx.test Error: timeout exceeded"
            " (in reply to RSET command)",
            False,
        ),
        (
            [b"500 5.3.0 Error: command failed\r\n", BYE],
            None,
            f"host {PEER} said: 500 5.3.0 Error: command failed (in reply to RSET command)",
            True,
        ),
        (
            [b"250 2.0.0 Ok\r\n"],
            None,
            f"lost connection with {PEER} while sending MAIL FROM",
            False,
        ),
        (
            [b"250 2.0.0 Ok\r\n", b"421 4.7.0 mx.test Error: too many messages\r\n"],
            None,
            f"host {PEER} said: 421 4.7.0 mx.test Error: too many messages"
            " (in reply to MAIL FROM command)",
            False,
        ),
    ],
    ids=["eof-rset", "timeout-rset", "421-rset", "5xx-rset", "eof-mail", "421-mail"],
)
def test_reused_session_dead_before_mail_reply_is_reuse_failed(replies, timeout_at, text, quits):
    """Nothing was delivered: no per-recipient results, the adapter uses a new connection."""
    writes, events, client = second_transaction(replies, timeout_at=timeout_at)
    assert events == [ReuseFailed(text)]
    assert writes[0] == b"RSET\r\n"
    assert (writes[-1] == b"QUIT\r\n") is quits
    assert client.phase.value == "closed"


def test_reused_session_lost_after_mail_reply_defers_as_a_result():
    writes, events, _ = second_transaction([b"250 2.0.0 Ok\r\n", b"250 2.1.0 Ok\r\n"])
    assert [r[1:3] for r in results_of(events)] == [("deferred", "4.4.2")]


def test_reused_session_mail_rejected_is_a_result():
    replies = b"550 5.7.1 sender rejected\r\n554 5.5.1 no valid recipients\r\n"
    _, events, _ = second_transaction([b"250 2.0.0 Ok\r\n", replies, BYE])
    assert [r[1:3] for r in results_of(events)] == [("bounced", "5.7.1")]


def test_first_transaction_lost_before_mail_reply_defers_as_a_result():
    _, events, client = converse([GREETING, EHLO_PIPELINING], ONE)
    assert [r[1:3] for r in results_of(events)] == [("deferred", "4.4.2")]
    assert client.transactions == 1


def test_second_transaction_after_failed_one_starts_with_rset():
    client = Client("client.example", peer=PEER)
    client.receive_data(GREETING + EHLO_PIPELINING)
    next_io(client)
    one = Envelope("s@x.test", ["a@y.test"], CONTENT)
    client.start_transaction(one)
    client.receive_data(b"250 Ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
    _, events = next_io(client)
    assert events[-1].results[0].status == "bounced"
    client.start_transaction(one)
    writes, _ = next_io(client)
    assert writes == [b"RSET\r\n"]
    client.receive_data(b"250 2.0.0 Ok\r\n")
    writes, _ = next_io(client)
    assert writes[0].startswith(b"MAIL FROM:<s@x.test> SIZE=21\r\nRCPT TO:<a@y.test>\r\n")


def test_start_transaction_out_of_turn_is_a_local_error():
    client = Client("client.example")
    with pytest.raises(LocalProtocolError):
        client.start_transaction(ENVELOPE)


# ---- dot-stuffing (RFC 5321 §4.5.2) ----


@pytest.mark.parametrize(
    ("content", "payload"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n"),
        (b".leading\r\nx\r\n", b"..leading\r\nx\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"no final crlf", b"no final crlf\r\n"),
        (b"x\r\n.", b"x\r\n..\r\n"),
        (b".", b"..\r\n"),
        (b"", b""),
        (b"bare\nlf\n.dot\n", b"bare\r\nlf\r\n..dot\r\n"),
        (b"mixed\r\nbare\n", b"mixed\r\nbare\r\n"),
        # stray CRs become spaces: no <CR>.<CR> reaches a next hop (SMTP smuggling)
        (b"hi\r.\rMAIL FROM:<x@y>\r\n", b"hi . MAIL FROM:<x@y>\r\n"),
        (b"a\r\r\nb\r", b"a \r\nb \r\n"),
        (b"a\r\n.\rb\n", b"a\r\n.. b\r\n"),
    ],
)
def test_dot_stuff(content, payload):
    assert dot_stuff(content) == payload


def test_sent_content_is_stuffed_and_terminated():
    envelope = Envelope("s@x.test", ["a@y.test"], b".one\r\ntwo\r\n.\r\nthree")
    replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
    writes, _, _ = converse([GREETING, EHLO_PIPELINING, replies, QUEUED, BYE], envelope)
    assert writes[2] == b"..one\r\ntwo\r\n..\r\nthree\r\n.\r\n"


lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a b", b"\xc3\xa9"]), max_size=8)


@given(lines, st.booleans())
def test_dot_stuff_round_trips_through_the_server_reader(parts, final_crlf):
    content = b"\r\n".join(parts) + (b"\r\n" if final_crlf and parts else b"")
    reader = Reader()
    reader.feed(dot_stuff(content) + b".\r\n")
    data, done = reader.read_data()
    expected = content if content.endswith(b"\r\n") or not content else content + b"\r\n"
    assert (data, done) == (expected, True)
