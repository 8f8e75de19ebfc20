"""A relay host that does not resolve defers with 4.3.5 (Postfix's "relayhost configuration
problem", smtp_connect.c) instead of bouncing every message; a transport_maps next hop that
does not resolve still bounces, as in Postfix. Against unbound on loopback (NXDOMAIN)."""

import io

import pytest
from test_delivery_smtp import run

from engine.config import Config
from engine.delivery import DeliveryRequest, PermanentFailure, TransientFailure
from engine.delivery.route import nexthop_for
from engine.delivery.smtp import deliver
from engine.dns import Resolver
from engine.log import Maillog

NOT_FOUND = ("Host or domain name not found. Name service error for name=smtp.relay-typo.test "
             "type=A: Host not found")


def attempt(config, domain="gmail.example", sender="a@x.test"):
    hop = nexthop_for(domain, config, sender)
    request = DeliveryRequest("Q1", sender, [f"b@{domain}"], b"Subject: x\r\n\r\nhi\r\n", hop)
    log = io.StringIO()
    with pytest.raises((TransientFailure, PermanentFailure)) as info:
        run(deliver(request, config, Resolver(config), maillog=Maillog("h.test", stream=log)))
    return info.value, log.getvalue()


@pytest.fixture
def dns(dns_server):
    host, port = dns_server(["other.test. 60 IN A 127.0.0.1"])  # the rest of .test: NXDOMAIN
    return (f"{host}:{port}",)


@pytest.mark.parametrize("settings, setting", [
    ({"relayhost": "[smtp.relay-typo.test]"}, "relayhost"),
    ({"sender_dependent_relayhost_maps": {"@x.test": "[smtp.relay-typo.test]"}},
     "sender_dependent_relayhost_maps"),
    ({"relayhost": "[smtp.relay-typo.test]",  # the default transport's own relay host
      "sender_dependent_default_transport_maps": {"@x.test": "smtp:"}}, "relayhost"),
])
def test_relay_host_that_does_not_resolve_defers_4_3_5(dns, settings, setting):
    error, log = attempt(Config(myhostname="h.test", dns_servers=dns, **settings))
    assert type(error) is TransientFailure
    assert (error.dsn, error.text) == ("4.3.5", NOT_FOUND)
    assert f"warning: {setting} configuration problem" in log


def test_transport_next_hop_that_does_not_resolve_still_bounces(dns):
    config = Config(myhostname="h.test", dns_servers=dns,
                    transport_maps={"gmail.example": "smtp:[smtp.relay-typo.test]"})
    error, log = attempt(config)
    assert type(error) is PermanentFailure
    assert (error.dsn, error.text) == ("5.4.4", NOT_FOUND)
    assert "configuration problem" not in log


def test_relay_host_that_is_myself_defers_4_3_5(dns):
    config = Config(myhostname="h.test", dns_servers=dns, relayhost="[127.0.0.1]:2525")
    error, _ = attempt(config)  # Config's default [[listen]] is 127.0.0.1:2525
    assert (type(error), error.dsn, error.text) == (
        TransientFailure, "4.3.5", "mail for 127.0.0.1 loops back to myself")
