"""The SMTP delivery agent end to end: real smtp-sink peers (and unbound for MX) on loopback."""

import asyncio

import pytest
import uvloop

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop, PermanentFailure, TransientFailure
from engine.delivery.smtp import deliver
from engine.dns import Resolver

CONTENT = b"Subject: test\r\n\r\n.leading dot\r\nline\r\n.\r\nlast line without CRLF"
RECIPIENTS = ["b@y.test", "c@y.test"]


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def request_to(host, port, *, mx_lookup=False, **fields):
    return DeliveryRequest(
        "4Xyz",
        "a@x.test",
        list(RECIPIENTS),
        CONTENT,
        NextHop("smtp", host, port, mx_lookup),
        **fields,
    )


@pytest.fixture
def config():
    return Config(myhostname="client.tern.test", smtp_connect_timeout=2.0, dns_timeout=2.0)


def test_two_recipients_in_one_transaction(smtp_sink, config):
    sink = smtp_sink()
    request = request_to("127.0.0.1", sink.port, body_8bit=True)
    outcome = run(deliver(request, config, Resolver(config)))
    relay = f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert [(r.recipient, r.status, r.dsn, r.reply, r.relay) for r in outcome.results] == [
        (rcpt, "sent", "2.0.0", "250 2.0.0 Ok", relay) for rcpt in RECIPIENTS
    ]
    assert outcome.connect_seconds > 0 and outcome.transfer_seconds > 0
    (message,) = sink.messages()
    assert message.sender == "a@x.test"
    assert message.recipients == tuple(RECIPIENTS)
    assert message.helo == "client.tern.test"
    assert message.mail_args == "<a@x.test> BODY=8BITMIME"
    assert message.content == CONTENT + b"\r\n"


def test_soft_rejected_recipients_are_deferred(smtp_sink, config):
    sink = smtp_sink("-r", "RCPT")
    outcome = run(deliver(request_to("127.0.0.1", sink.port), config, Resolver(config)))
    said = "host 127.0.0.1[127.0.0.1] said: 450 4.3.0 Error: command failed"
    assert [(r.status, r.dsn, r.reply) for r in outcome.results] == [
        ("deferred", "4.3.0", f"{said} (in reply to RCPT TO command)")
    ] * 2
    assert sink.messages() == []


def test_rejected_end_of_data_bounces(smtp_sink, config):
    sink = smtp_sink("-f", ".")
    outcome = run(deliver(request_to("127.0.0.1", sink.port), config, Resolver(config)))
    assert {(r.status, r.dsn) for r in outcome.results} == {("bounced", "5.3.0")}
    assert outcome.results[0].reply.endswith("(in reply to end of DATA command)")


def test_next_hop_down_is_transient_then_delivers_when_up(smtp_sink, config):
    sink = smtp_sink()
    sink.stop()
    request = request_to("127.0.0.1", sink.port)
    with pytest.raises(TransientFailure) as info:
        run(deliver(request, config, Resolver(config)))
    assert info.value.dsn == "4.4.1"
    assert info.value.text == f"connect to 127.0.0.1[127.0.0.1]:{sink.port}: Connection refused"
    assert info.value.relay == "none"  # no session, as Postfix logs it
    sink.start()
    outcome = run(deliver(request, config, Resolver(config)))
    assert {r.status for r in outcome.results} == {"sent"}
    assert len(sink.messages()) == 1


def test_refused_greeting_only_server_is_transient(smtp_sink, config):
    sink = smtp_sink("-f", "CONNECT")
    with pytest.raises(TransientFailure) as info:
        run(deliver(request_to("127.0.0.1", sink.port), config, Resolver(config)))
    assert info.value.dsn == "4.3.0"  # a 5xx greeting defers (Postfix's smtp_skip_5xx_greeting)
    assert info.value.text == (
        "host 127.0.0.1[127.0.0.1] refused to talk to me: 500 5.3.0 Error: command failed"
    )
    assert info.value.relay == f"127.0.0.1[127.0.0.1]:{sink.port}"


def test_data_timeout_defers_with_postfix_text(smtp_sink):
    sink = smtp_sink("-p", "-w", "5")  # -w delays nothing when pipelining
    config = Config(myhostname="client.tern.test", smtp_data_init_timeout=0.3)
    outcome = run(deliver(request_to("127.0.0.1", sink.port), config, Resolver(config)))
    assert {(r.status, r.dsn, r.reply) for r in outcome.results} == {
        (
            "deferred",
            "4.4.2",
            "conversation with 127.0.0.1[127.0.0.1] timed out while sending DATA command",
        )
    }


def test_mx_delivery_tries_hosts_in_preference_order(dns_server, smtp_sink, config):
    """mail1 (preference 10) refuses the greeting, mail2 (20) has nothing listening, mail3 (30)
    takes the mail: every MX host shares the port, which DNS cannot carry."""
    good = smtp_sink(host="127.0.0.1")
    smtp_sink("-f", "CONNECT", host="127.0.0.2", port=good.port)
    host, port = dns_server(
        [
            "mx.test. 60 IN MX 10 mail1.mx.test.",
            "mx.test. 60 IN MX 20 mail2.mx.test.",
            "mx.test. 60 IN MX 30 mail3.mx.test.",
            "mail1.mx.test. 60 IN A 127.0.0.2",
            "mail2.mx.test. 60 IN A 127.0.0.3",
            "mail3.mx.test. 60 IN A 127.0.0.1",
        ]
    )
    config = Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",))
    request = request_to("mx.test", good.port, mx_lookup=True)
    outcome = run(deliver(request, config, Resolver(config)))
    assert {(r.status, r.relay) for r in outcome.results} == {
        ("sent", f"mail3.mx.test[127.0.0.1]:{good.port}")
    }
    (message,) = good.messages()
    assert message.recipients == tuple(RECIPIENTS)


def test_mx_delivery_all_hosts_down_reports_the_last_error(dns_server, smtp_sink, config):
    host, port = dns_server(["aonly.test. 60 IN A 127.0.0.1"])
    down = smtp_sink()
    down.stop()
    config = Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",))
    with pytest.raises(TransientFailure) as info:
        run(deliver(request_to("aonly.test", down.port, mx_lookup=True), config, Resolver(config)))
    assert info.value.text == f"connect to aonly.test[127.0.0.1]:{down.port}: Connection refused"


def test_mx_primary_refused_backup_without_address_defers(dns_server, smtp_sink):
    """Postfix defers when any MX host failed transiently: the backup's missing address
    (permanent, 5.4.4) must not bounce mail the primary only refused for now."""
    down = smtp_sink()
    down.stop()
    host, port = dns_server(
        [
            "mx.test. 60 IN MX 10 mail1.mx.test.",
            "mx.test. 60 IN MX 20 mail2.mx.test.",  # mail2.mx.test: NXDOMAIN
            "mail1.mx.test. 60 IN A 127.0.0.1",
        ]
    )
    config = Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",))
    with pytest.raises(TransientFailure) as info:
        run(deliver(request_to("mx.test", down.port, mx_lookup=True), config, Resolver(config)))
    assert info.value.dsn == "4.4.1"
    assert info.value.text == f"connect to mail1.mx.test[127.0.0.1]:{down.port}: Connection refused"
    assert info.value.relay == "none"


def test_mx_reason_is_what_a_server_said_over_later_failures(dns_server, smtp_sink):
    """mail1 refuses the greeting, mail2 refuses the connection, mail3 has no address: the
    mail defers, with mail1's reply as the reason (the most informative)."""
    refusing = smtp_sink("-f", "CONNECT", host="127.0.0.2")
    host, port = dns_server(
        [
            "mx.test. 60 IN MX 10 mail1.mx.test.",
            "mx.test. 60 IN MX 20 mail2.mx.test.",
            "mx.test. 60 IN MX 30 mail3.mx.test.",
            "mail1.mx.test. 60 IN A 127.0.0.2",
            "mail2.mx.test. 60 IN A 127.0.0.3",
            "mail3.mx.test. 60 IN TXT no-address",
        ]
    )
    config = Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",))
    request = request_to("mx.test", refusing.port, mx_lookup=True)
    with pytest.raises(TransientFailure) as info:
        run(deliver(request, config, Resolver(config)))
    assert info.value.dsn == "4.3.0"
    assert info.value.text == (
        "host mail1.mx.test[127.0.0.2] refused to talk to me: 500 5.3.0 Error: command failed"
    )
    assert info.value.relay == f"mail1.mx.test[127.0.0.2]:{refusing.port}"


def test_mx_every_host_without_address_bounces(dns_server):
    host, port = dns_server(
        [
            "mx.test. 60 IN MX 10 mail1.mx.test.",
            "mx.test. 60 IN MX 20 mail2.mx.test.",
            "mail1.mx.test. 60 IN TXT no-address",
        ]
    )
    config = Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",))
    with pytest.raises(PermanentFailure) as info:
        run(deliver(request_to("mx.test", 25, mx_lookup=True), config, Resolver(config)))
    assert info.value.dsn == "5.4.4"
    assert "name=mail2.mx.test type=A: Host not found" in info.value.text


DSN_FIELDS = {
    "ret": "HDRS",
    "envid": "Q+2Bid.1",
    "notify": {"b@y.test": "SUCCESS,FAILURE", "c@y.test": "NEVER"},
    "orcpt": {"b@y.test": "rfc822;B+2Bx@y.test"},
}


def test_dsn_request_passed_on_to_a_dsn_server(smtp_sink, config):
    """RFC 3461 §5.2.1: smtp-sink offers DSN, so RET/ENVID and NOTIFY/ORCPT go on as stored,
    and the outcome says the notices are the next hop's duty now."""
    sink = smtp_sink()
    request = request_to("127.0.0.1", sink.port, **DSN_FIELDS)
    outcome = run(deliver(request, config, Resolver(config)))
    assert {r.status for r in outcome.results} == {"sent"}
    assert outcome.dsn_passed
    (message,) = sink.messages()
    assert message.mail_args == "<a@x.test> RET=HDRS ENVID=Q+2Bid.1"
    assert message.rcpt_args == (
        "<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx@y.test",
        "<c@y.test> NOTIFY=NEVER",
    )


def test_dsn_request_kept_from_a_server_without_dsn(smtp_sink, config):
    sink = smtp_sink("-N")  # smtp-sink(1): do not announce support for DSN
    request = request_to("127.0.0.1", sink.port, **DSN_FIELDS)
    outcome = run(deliver(request, config, Resolver(config)))
    assert {r.status for r in outcome.results} == {"sent"}
    assert not outcome.dsn_passed
    (message,) = sink.messages()
    assert message.mail_args == "<a@x.test>"
    assert message.rcpt_args == ("<b@y.test>", "<c@y.test>")
