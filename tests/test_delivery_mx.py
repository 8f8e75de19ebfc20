"""The SMTP delivery agent's walk over MX hosts: a 4xx greeting, smtp_mx_address_limit and
smtp_mx_session_limit, against unbound and smtp-sink peers on loopback (every MX host on its
own 127.0.0.x address, all on one port, which DNS cannot carry)."""

import pytest
from test_delivery_smtp import RECIPIENTS, request_to, run

from engine.config import Config
from engine.delivery import TransientFailure
from engine.delivery.smtp import deliver
from engine.dns import Resolver

THREE_MX = [
    "mx.test. 60 IN MX 10 mail1.mx.test.",
    "mx.test. 60 IN MX 20 mail2.mx.test.",
    "mx.test. 60 IN MX 30 mail3.mx.test.",
    "mail1.mx.test. 60 IN A 127.0.0.2",
    "mail2.mx.test. 60 IN A 127.0.0.3",
    "mail3.mx.test. 60 IN A 127.0.0.1",
]


def mx_config(dns_server, **settings):
    host, port = dns_server(THREE_MX)
    return Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",), **settings)


def test_4xx_greeting_tries_the_next_mx(dns_server, smtp_sink):
    good = smtp_sink(host="127.0.0.1")
    smtp_sink("-r", "CONNECT", host="127.0.0.2", port=good.port)
    smtp_sink("-r", "CONNECT", host="127.0.0.3", port=good.port)
    config = mx_config(dns_server)
    outcome = run(deliver(request_to("mx.test", good.port, mx_lookup=True), config,
                          Resolver(config)))
    assert {(r.status, r.relay) for r in outcome.results} == {
        ("sent", f"mail3.mx.test[127.0.0.1]:{good.port}")
    }
    assert len(good.messages()) == 1


@pytest.mark.parametrize("limit, sent", [(2, False), (3, True), (0, True)])
def test_mx_address_limit_caps_the_addresses_tried(dns_server, smtp_sink, limit, sent):
    good = smtp_sink(host="127.0.0.1")  # mail1 and mail2: nothing listens there
    config = mx_config(dns_server, smtp_mx_address_limit=limit)
    request = request_to("mx.test", good.port, mx_lookup=True)
    if sent:
        outcome = run(deliver(request, config, Resolver(config)))
        assert {r.status for r in outcome.results} == {"sent"}
    else:
        with pytest.raises(TransientFailure) as info:
            run(deliver(request, config, Resolver(config)))
        assert info.value.text == (
            f"connect to mail2.mx.test[127.0.0.3]:{good.port}: Connection refused"
        )
        assert good.messages() == []


@pytest.mark.parametrize("limit", [2, 3, 0])
def test_deferred_recipients_go_to_the_next_mx_up_to_the_session_limit(
    dns_server, smtp_sink, limit
):
    good = smtp_sink(host="127.0.0.1")
    smtp_sink("-r", "RCPT", host="127.0.0.2", port=good.port)  # a session, every RCPT 450
    smtp_sink("-r", "RCPT", host="127.0.0.3", port=good.port)
    config = mx_config(dns_server, smtp_mx_session_limit=limit)
    outcome = run(deliver(request_to("mx.test", good.port, mx_lookup=True), config,
                          Resolver(config)))
    assert [r.recipient for r in outcome.results] == RECIPIENTS
    if limit == 2:  # mail1 and mail2 each had a session: the last one's reply is the result
        assert {(r.status, r.relay) for r in outcome.results} == {
            ("deferred", f"mail2.mx.test[127.0.0.3]:{good.port}")
        }
        assert outcome.results[0].reply.startswith("host mail2.mx.test[127.0.0.3] said: 450")
        assert good.messages() == []
    else:
        assert {(r.status, r.relay) for r in outcome.results} == {
            ("sent", f"mail3.mx.test[127.0.0.1]:{good.port}")
        }
        (message,) = good.messages()
        assert message.recipients == tuple(RECIPIENTS)


def test_only_the_deferred_recipients_go_to_the_next_mx(dns_server, smtp_sink, tern):
    """mail1 (Tern's server) takes b and defers c with 450; c alone goes on to mail2."""
    relay = smtp_sink()
    server = tern(
        relayhost=relay.nexthop,
        smtpd_recipient_restrictions=(
            "check_recipient_access inline:{ { c@y.test=450 4.2.0 later } }"
        ),
    )
    backup = smtp_sink(host="127.0.0.3", port=server.port)
    host, port = dns_server(
        [
            "mx.test. 60 IN MX 10 mail1.mx.test.",
            "mx.test. 60 IN MX 20 mail2.mx.test.",
            "mail1.mx.test. 60 IN A 127.0.0.1",
            "mail2.mx.test. 60 IN A 127.0.0.3",
        ]
    )
    config = Config(myhostname="client.tern.test", dns_servers=(f"{host}:{port}",))
    outcome = run(deliver(request_to("mx.test", server.port, mx_lookup=True), config,
                          Resolver(config)))
    assert [(r.recipient, r.status, r.relay) for r in outcome.results] == [
        ("b@y.test", "sent", f"mail1.mx.test[127.0.0.1]:{server.port}"),
        ("c@y.test", "sent", f"mail2.mx.test[127.0.0.3]:{server.port}"),
    ]
    (message,) = backup.messages()
    assert message.recipients == ("c@y.test",)


def test_a_session_lost_before_the_content_hands_the_recipients_to_the_next_mx(
    dns_server, smtp_sink
):
    """mail1 and mail2 drop the connection on DATA (smtp-sink -q): nothing of the message went,
    so, as Postfix, the recipients go on to the next MX host in the same delivery."""
    good = smtp_sink(host="127.0.0.1")
    smtp_sink("-q", "DATA", host="127.0.0.2", port=good.port)
    smtp_sink("-q", "DATA", host="127.0.0.3", port=good.port)
    config = mx_config(dns_server, smtp_mx_session_limit=0)
    outcome = run(deliver(request_to("mx.test", good.port, mx_lookup=True), config,
                          Resolver(config)))
    assert {(r.status, r.relay) for r in outcome.results} == {
        ("sent", f"mail3.mx.test[127.0.0.1]:{good.port}")
    }
    (message,) = good.messages()
    assert message.recipients == tuple(RECIPIENTS)
