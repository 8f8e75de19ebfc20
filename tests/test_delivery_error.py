"""The error and discard transports: their results, and Postfix's log lines from a real server."""

import asyncio
import re
import smtplib

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop, trivial
from engine.delivery.route import nexthop_for


def outcome(agent, nexthop):
    request = DeliveryRequest("4Q", "s@x.test", ["a@y.test", "b@y.test"], b"x\r\n",
                              NextHop("t", nexthop, 0, False))
    results = asyncio.run(agent(request, Config(myhostname="mx.example.test"))).results
    assert {r.recipient for r in results} == {"a@y.test", "b@y.test"}
    assert len({(r.status, r.dsn, r.reply, r.relay) for r in results}) == 1
    return results[0].status, results[0].dsn, results[0].reply, results[0].relay


def test_error_bounces_with_the_nexthop_text():
    assert outcome(trivial.error, "mailbox retired") == (
        "bounced", "5.0.0", "mailbox retired", "none")
    assert outcome(trivial.error, "5.7.1 go away") == ("bounced", "5.7.1", "go away", "none")
    # error(8) bounces whatever class its code names (Postfix: "bounces ... all recipients")
    assert outcome(trivial.error, "4.2.1 try later") == (
        "bounced", "5.2.1", "try later", "none")
    assert outcome(trivial.error, "2.0.0 fine") == ("bounced", "5.0.0", "fine", "none")


def test_retry_defers_with_the_nexthop_text():
    assert outcome(trivial.retry, "") == ("deferred", "4.0.0", "mail delivery deferred", "none")
    assert outcome(trivial.retry, "4.3.2 maintenance") == (
        "deferred", "4.3.2", "maintenance", "none")
    assert outcome(trivial.retry, "5.7.1 not yet") == ("deferred", "4.7.1", "not yet", "none")


def test_discard_is_sent_with_the_reason():
    assert outcome(trivial.discard, "y.test") == ("sent", "2.0.0", "y.test", "none")
    assert outcome(trivial.discard, "2.6.0 silenced") == ("sent", "2.6.0", "silenced", "none")
    assert outcome(trivial.discard, "5.1.1 no") == ("sent", "2.1.1", "no", "none")


def test_routes_keep_the_nexthop_text():
    config = Config(transport_maps={"old.test": "error:5.1.1 user has moved",
                                    "null.test": "discard:", ".sub.test": "discard:quiet",
                                    "later.test": "retry:4.3.2 maintenance"})
    assert nexthop_for("old.test", config) == NextHop("error", "5.1.1 user has moved", 0, False)
    assert nexthop_for("later.test", config) == NextHop("retry", "4.3.2 maintenance", 0, False)
    assert nexthop_for("null.test", config) == NextHop("discard", "null.test", 0, False)
    assert nexthop_for("a.sub.test", config).host == "quiet"


def test_error_and_discard_log_lines_from_a_running_server(tern):
    server = tern(transport_maps={"old.example": "error:5.1.1 user has moved away",
                                  "null.example": "discard:"})
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        client.sendmail("alice@example.org", ["a@old.example", "b@null.example"],
                        b"Subject: x\r\n\r\nbody\r\n")
    log = server.wait_log("removed", count=2)  # the message and its bounce notice
    assert re.search(r" tern/error\[\d+\]: \w+: to=<a@old\.example>, relay=none, delay=[\d.]+, "
                     r"delays=[\d./]+, dsn=5\.1\.1, status=bounced \(user has moved away\)",
                     log), log
    assert re.search(r" tern/discard\[\d+\]: \w+: to=<b@null\.example>, relay=none, "
                     r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, status=sent \(null\.example\)",
                     log), log
    assert "sender non-delivery notification" in log


def test_retry_log_line_from_a_running_server(tern):
    server = tern(transport_maps={"later.example": "retry:4.3.2 down for maintenance"})
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        client.sendmail("alice@example.org", ["c@later.example"], b"Subject: x\r\n\r\nbody\r\n")
    log = server.wait_log("status=deferred")
    assert re.search(r" tern/retry\[\d+\]: \w+: to=<c@later\.example>, relay=none, "
                     r"delay=[\d.]+, delays=[\d./]+, dsn=4\.3\.2, status=deferred "
                     r"\(down for maintenance\)", log), log
