"""Delivery status notifications through the whole path, against real peers: a next hop that
refuses the recipient makes Tern queue a bounce, which goes out like any mail to the sender's
own next hop (two Postfix smtp-sinks), from the null sender."""

import email
import email.policy
import os
import re
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest


def sinks_and_tern(tern, smtp_sink, *accepting_flags, **settings):
    refusing = smtp_sink("-f", "RCPT")  # hard (5xx) reject of every RCPT
    accepting = smtp_sink(*accepting_flags)
    server = tern(transport_maps={
        "bad.test": f"smtp:{refusing.nexthop}",
        "example.org": f"smtp:{accepting.nexthop}",
    }, **settings)
    return refusing, accepting, server


def report_of(content: bytes):
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    return message, message.get_payload()


def test_refused_recipient_bounces_to_the_sender(tern, smtp_sink):
    _, accepting, server = sinks_and_tern(tern, smtp_sink)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail("alice@example.org", ["nobody@bad.test"],
                        b"Subject: doomed\r\nMessage-ID: <doomed@example.org>\r\n\r\nhello\r\n",
                        mail_options=["RET=HDRS", "ENVID=env+2B1"])
    (bounce,) = accepting.wait_messages(1, timeout=15)
    assert bounce.sender == "" and list(bounce.recipients) == ["alice@example.org"]
    message, parts = report_of(bounce.content)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; nobody@bad.test" in status
    assert "Action: failed" in status and re.search(r"Status: 5\.\d\.\d", status)
    assert "Original-Envelope-Id: env+1" in status
    assert "Diagnostic-Code: smtp; 5" in status
    assert parts[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
    log = server.wait_log("sender non-delivery notification")
    assert re.search(r"to=<nobody@bad.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
                     r"status=bounced", log)


def test_notify_success_gets_a_relayed_notice_and_never_gets_nothing(tern, smtp_sink):
    """The next hop does not offer DSN (-N): Tern itself reports the relay."""
    _, accepting, server = sinks_and_tern(tern, smtp_sink, "-N")
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail("alice@example.org", ["bob@example.org"], b"Subject: ok\r\n\r\nhi\r\n",
                        rcpt_options=["NOTIFY=SUCCESS"])
        client.sendmail("carol@example.org", ["nobody@bad.test"], b"Subject: x\r\n\r\nhi\r\n",
                        rcpt_options=["NOTIFY=NEVER"])
    messages = accepting.wait_messages(2, timeout=15)
    notices = [m for m in messages if m.sender == ""]
    assert [list(m.recipients) for m in notices] == [["alice@example.org"]]
    _, parts = report_of(notices[0].content)
    assert "Action: relayed" in parts[1].as_string()
    # bob's message, carol's, and the success notice: each settled (notices come before removal)
    log = server.wait_log(": removed", count=3)
    assert "status=bounced" in log and "sender delivery status notification" in log
    assert "non-delivery notification" not in log  # NOTIFY=NEVER


def test_a_dsn_capable_next_hop_gets_the_request_and_tern_sends_no_notice(tern, smtp_sink):
    _, accepting, server = sinks_and_tern(tern, smtp_sink)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail("alice@example.org", ["bob@example.org"], b"Subject: ok\r\n\r\nhi\r\n",
                        mail_options=["RET=HDRS", "ENVID=e1"],
                        rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@example.org"])
    (message,) = accepting.wait_messages(1, timeout=15)
    assert "RET=HDRS" in message.mail_args and "ENVID=e1" in message.mail_args
    assert "NOTIFY=SUCCESS" in message.rcpt_args[0]
    assert "ORCPT=rfc822;bob@example.org" in message.rcpt_args[0]
    log = server.wait_log(": removed")
    assert "notification" not in log


@pytest.fixture
def world():
    """A 0755 directory under /tmp (pytest's base temp is 0700: another uid cannot reach it)."""
    path = Path(tempfile.mkdtemp(prefix="tern-notice-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bounce_of_an_smtputf8_message_goes_with_smtputf8(tern, world):
    """A UTF-8 sender's message bounces at Tern A (error: transport); the bounce goes from
    <> to a second Tern (which offers SMTPUTF8) with MAIL FROM:<> … SMTPUTF8 (its Received:
    says UTF8SMTP, which only that parameter gives), lands in a Maildir there, and reads as an
    RFC 6533 report naming the UTF-8 addresses."""
    base = world / "vmail"
    (base / "inbox").mkdir(parents=True)
    owner = 65534 if os.geteuid() == 0 else os.getuid()
    if os.geteuid() == 0:
        for path in (base, base / "inbox"):
            os.chown(path, owner, owner)
    sink = tern(myhostname="sink.tern.test", virtual_mailbox_domains=["sink.test"],
                virtual_mailbox_base=str(base), virtual_mailbox_maps="static:inbox/",
                virtual_uid_maps=f"static:{owner}", virtual_gid_maps=f"static:{owner}",
                virtual_minimum_uid=1)
    server = tern(transport_maps={"bad.test": "error:5.1.1 mailbox unavailable",
                                  "sink.test": f"smtp:[127.0.0.1]:{sink.port}"})
    original = "Subject: Grüße\r\nFrom: jörg@sink.test\r\n\r\nblåbærsyltetøy\r\n".encode()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.sendmail("jörg@sink.test", ["nöbody@bad.test"], original,
                               mail_options=["SMTPUTF8"]) == {}
    server.wait_log("sender non-delivery notification")
    log = sink.wait_log("status=sent (delivered to maildir)")
    assert "from=<>" in log
    new = base / "inbox" / "new"
    (path,) = list(new.iterdir())
    content = path.read_bytes().replace(b"\n", b"\r\n")  # a Maildir file has LF ends
    assert content.startswith("Return-Path: <>\r\nDelivered-To: jörg@sink.test\r\n"
                              "Received: from mx.tern.test (unknown [127.0.0.1])\r\n"
                              "\tby sink.tern.test (Tern) with UTF8SMTP id ".encode())
    message, parts = report_of(content)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert str(message["To"]) == "jörg@sink.test"
    text, status, returned = parts
    assert "<nöbody@bad.test>: mailbox unavailable" in " ".join(
        text.get_payload(decode=True).decode("utf-8").split())
    assert status.get_content_type() == "message/global-delivery-status"
    assert "\r\nFinal-Recipient: utf-8; nöbody@bad.test\r\n".encode() in content
    assert returned.get_content_type() == "message/global"
    assert returned.get_payload()[0]["Subject"] == "Grüße"
    assert b"\r\n\r\n" + original.split(b"\r\n\r\n")[1] in content
