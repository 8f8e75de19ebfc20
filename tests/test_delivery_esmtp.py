"""The SMTP delivery agent's ESMTP rules end to end: BDAT and SIZE against Tern's own server
(which offers CHUNKING and SIZE), DATA and SMTPUTF8 against Postfix's smtp-sink (which offers
neither CHUNKING nor SMTPUTF8)."""

import pytest
from test_delivery_smtp import run

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery.smtp import deliver
from engine.dns import Resolver

CONTENT = b"Subject: chunked\r\n\r\n.leading dot\r\nline\r\n.\r\nlast line without CRLF"


def request(port, content=CONTENT, *, sender="a@x.test", recipients=("b@y.test",), **fields):
    return DeliveryRequest(
        "4Xyz", sender, list(recipients), content, NextHop("smtp", "127.0.0.1", port, False),
        **fields,
    )


def same_message(received: bytes, sent: bytes) -> bool:
    """``received`` is ``sent`` with headers added (Received:, Date:, Message-ID:)."""
    got_headers, _, got_body = received.partition(b"\r\n\r\n")
    headers, _, body = sent.partition(b"\r\n\r\n")
    return got_body == body and headers in got_headers


def config(**settings):
    return Config(myhostname="client.tern.test", smtp_connect_timeout=5.0, **settings)


@pytest.mark.parametrize("discard, commands", [((), "bdat=1"), (("chunking",), "data=1")])
def test_bdat_to_tern_unless_chunking_is_discarded(tern, smtp_sink, discard, commands):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    settings = config(smtp_discard_ehlo_keywords=discard)
    outcome = run(deliver(request(server.port), settings, Resolver(settings)))
    ((status, dsn, reply),) = [(r.status, r.dsn, r.reply) for r in outcome.results]
    assert (status, dsn) == ("sent", "2.0.0") and "queued as" in reply
    server.wait_log(f"ehlo=1 mail=1 rcpt=1 {commands} quit=1 commands=5")
    (message,) = sink.wait_messages(1, timeout=15)
    # the content as sent, through Tern's server and its own client (which add headers)
    assert same_message(message.content, CONTENT + b"\r\n")


def test_bdat_message_in_several_chunks_arrives_whole(tern, smtp_sink, monkeypatch):
    import engine.delivery.smtp as agent

    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    content = b"Subject: big\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(3000))
    monkeypatch.setattr(agent, "CHUNK_SIZE", 4096)
    settings = config()
    outcome = run(deliver(request(server.port, content), settings, Resolver(settings)))
    assert outcome.results[0].status == "sent"
    server.wait_log(f"rcpt=1 bdat={-(-len(content) // 4096)} quit=1")
    (message,) = sink.wait_messages(1, timeout=15)
    assert same_message(message.content, content)


def test_message_over_the_next_hops_size_bounces_unsent(tern):
    server = tern(message_size_limit=1000)
    settings = config()
    content = b"Subject: big\r\n\r\n" + b"x" * 1000
    outcome = run(deliver(request(server.port, content), settings, Resolver(settings)))
    assert [(r.status, r.dsn, r.reply) for r in outcome.results] == [
        (
            "bounced",
            "5.3.4",
            f"message size {len(content)} exceeds size limit 1000 of server"
            " 127.0.0.1[127.0.0.1]",
        )
    ]
    log = server.wait_log("ehlo=1 quit=1 commands=2")  # no MAIL FROM, nothing sent
    assert "mail=" not in log


def test_smtputf8_message_to_smtp_sink_bounces_5_6_7(smtp_sink):
    sink = smtp_sink()
    settings = config()
    utf8 = request(sink.port, sender="caf\u00e9@x.test", smtputf8=True)
    outcome = run(deliver(utf8, settings, Resolver(settings)))
    assert [(r.status, r.dsn, r.reply) for r in outcome.results] == [
        (
            "bounced",
            "5.6.7",
            "SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]",
        )
    ]
    ascii_only = request(sink.port, smtputf8=True)  # requested, but nothing needs it
    outcome = run(deliver(ascii_only, settings, Resolver(settings)))
    assert outcome.results[0].status == "sent"
    (message,) = sink.messages()
    assert message.mail_args == "<a@x.test>"  # DATA, no SMTPUTF8 and no BDAT to smtp-sink
    assert message.content == CONTENT + b"\r\n"


def test_smtputf8_message_to_tern_goes_with_the_parameter(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    settings = config()
    utf8 = request(server.port, sender="caf\u00e9@x.test", smtputf8=True)
    outcome = run(deliver(utf8, settings, Resolver(settings)))
    # Tern's server takes a non-ASCII sender only with MAIL FROM … SMTPUTF8
    assert outcome.results[0].status == "sent"
    assert "from=<caf\u00e9@x.test>" in server.wait_log("from=<caf\u00e9@x.test>")
