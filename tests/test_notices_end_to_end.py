"""Delivery status notifications through the whole path, against real peers: a next hop that
refuses the recipient makes Tern queue a bounce, which goes out like any mail to the sender's
own next hop (two Postfix smtp-sinks), from the null sender."""

import email
import email.policy
import re
import smtplib


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
