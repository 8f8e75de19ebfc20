"""engine.bounce: DSN notices (RFC 3464 in RFC 6522 multipart/report), read back with the
stdlib email parser; one whole failure notice is compared with a golden file."""

import email
import email.policy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.bounce import delay_notice, failure_notice, success_notice
from engine.cleanup import rfc5322_date
from engine.config import Config
from engine.spool import Envelope, Recipient

GOLDEN = Path(__file__).parent / "data" / "bounce_failure.ref"
ARRIVAL = 1_800_000_000.0  # Fri, 15 Jan 2027 08:00:00 UTC
NOW = ARRIVAL + 600
CONFIG = Config(myhostname="mx.example.org")
ORIGINAL = (b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
            b"\tby mx.example.org (Tern) with ESMTP id 4Bc7Dfg8HjK0\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: Bob <bob@example.net>\r\n"
            b"Subject: Quarterly report\r\n"
            b"Message-Id: <20270115080000.4Bc7Dfg8HjK0@mx.example.org>\r\n"
            b"\r\n"
            b"Hello Bob,\r\n"
            b"\r\n"
            b"the figures are attached.\r\n")
REJECTED = ("host mx.example.net[192.0.2.25] said: 550 5.1.1 <bob@example.net>: Recipient "
            "address rejected: User unknown in virtual mailbox table (in reply to RCPT TO "
            "command)")
NOT_FOUND = ("Host or domain name not found. Name service error for name=example.com "
             "type=MX: Host not found")


@pytest.fixture
def utc(monkeypatch):
    """Dates in UTC, whatever the machine's zone (rfc5322_date uses local time)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def bob(**changes):
    fields = dict(address="bob@example.net", status="bounced", attempts=1, dsn="5.1.1",
                  last_reply=REJECTED, relay="mx.example.net[192.0.2.25]:25",
                  orcpt="rfc822;bob+2Bsales@example.net")
    return Recipient(**(fields | changes))


def carol(**changes):
    fields = dict(address="carol@example.com", status="bounced", attempts=1, dsn="5.4.4",
                  last_reply=NOT_FOUND, relay="none")
    return Recipient(**(fields | changes))


def envelope(recipients, **changes):
    fields = dict(queue_id="4Bc7Dfg8HjK0", sender="alice@example.org", recipients=recipients,
                  arrival=ARRIVAL, size=len(ORIGINAL), envid="Q1+2B7")
    return Envelope(**(fields | changes))


def failure(recipients=None, content=ORIGINAL, config=CONFIG, **changes):
    recipients = recipients or [bob()]
    return failure_notice(envelope(recipients, **changes), recipients, content, config, NOW)


def parse(raw):
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.defects == []
    return message


def parts(raw):
    message = parse(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    found = list(message.iter_parts())
    assert len(found) == 3
    for part in found:
        assert part.defects == []
    return found


def report(raw):
    """The delivery-status part as (per-message fields, [per-recipient fields])."""
    blocks = [dict(block.items()) for block in parts(raw)[1].get_payload()]
    return blocks[0], blocks[1:]


def human(raw):
    """The notification text, line-wrapping undone."""
    return " ".join(parts(raw)[0].get_content().split())


def test_failure_notice_is_a_multipart_report_of_three_parts():
    raw = failure()
    message = parse(raw)
    assert b"\r\nFrom: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\n" in b"\r\n" + raw
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"] == rfc5322_date(NOW)
    text, status, original = parts(raw)
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "us-ascii"
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "message/rfc822"
    assert [p["Content-Description"] for p in (text, status, original)] == [
        "Notification", "Delivery report", "Undelivered Message"]


def test_message_id_names_the_time_the_queue_id_and_the_kind(utc):
    assert parse(failure())["Message-Id"] == \
        "<20270115081000.4Bc7Dfg8HjK0-failure@mx.example.org>"
    recipients = [bob(status="deferred")]
    delayed = delay_notice(envelope(recipients), recipients, ORIGINAL, CONFIG, NOW)
    assert parse(delayed)["Message-Id"].endswith(".4Bc7Dfg8HjK0-delay@mx.example.org>")


def test_boundary_is_made_from_queue_id_time_and_hostname():
    assert parse(failure()).get_boundary() == "4Bc7Dfg8HjK0.1800000600/mx.example.org"


def test_boundary_changes_when_the_original_contains_it():
    content = ORIGINAL + b"--4Bc7Dfg8HjK0.1800000600/mx.example.org--\r\n"
    raw = failure(content=content)
    assert parse(raw).get_boundary() != "4Bc7Dfg8HjK0.1800000600/mx.example.org"
    returned = parts(raw)[2].get_payload()[0]
    assert returned.get_content().endswith("--4Bc7Dfg8HjK0.1800000600/mx.example.org--\r\n")


def all_notices(content=ORIGINAL):
    recipients = [bob(), carol()]
    env = envelope(recipients)
    return [failure_notice(env, recipients, content, CONFIG, NOW),
            delay_notice(env, recipients, content, CONFIG, NOW),
            success_notice(env, recipients, content, CONFIG, NOW)]


@pytest.mark.parametrize("content", [ORIGINAL, ORIGINAL.replace(b"\r\n", b"\n")])
def test_every_line_ends_in_crlf_even_when_the_original_has_bare_lf(content):
    for raw in all_notices(content):
        assert raw.endswith(b"\r\n")
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
        assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_per_message_fields():
    fields, _ = report(failure())
    assert fields == {
        "Original-Envelope-Id": "Q1+7",  # ENVID is stored as xtext: decoded here
        "Reporting-MTA": "dns; mx.example.org",
        "Arrival-Date": rfc5322_date(ARRIVAL),
        "X-Tern-Queue-ID": "4Bc7Dfg8HjK0",
        "X-Tern-Sender": "rfc822; alice@example.org",
    }


def test_no_original_envelope_id_without_envid():
    fields, _ = report(failure(envid=""))
    assert "Original-Envelope-Id" not in fields


def test_per_recipient_fields_of_an_smtp_rejection():
    _, [fields] = report(failure())
    assert fields == {
        "Original-Recipient": "rfc822; bob+sales@example.net",
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: "
                           "User unknown in virtual mailbox table",
        "Last-Attempt-Date": rfc5322_date(NOW),
    }


def test_per_recipient_fields_of_a_failure_without_smtp_reply():
    _, [fields] = report(failure([carol()]))
    assert fields["Diagnostic-Code"] == f"X-Tern; {NOT_FOUND}"
    assert "Remote-MTA" not in fields  # relay "none"
    assert "Original-Recipient" not in fields  # no ORCPT


@pytest.mark.parametrize("reply, code", [
    ("554 5.7.1 Service unavailable", "smtp; 554 5.7.1 Service unavailable"),
    ("550-5.1.1 first 550 5.1.1 last (in reply to RCPT TO command)",
     "smtp; 550-5.1.1 first 550 5.1.1 last"),
    ("host a.example[192.0.2.1] said: 552 too big (in reply to end of DATA command)",
     "smtp; 552 too big"),
    ("conversation with a.example[192.0.2.1] timed out while sending RCPT TO",
     "X-Tern; conversation with a.example[192.0.2.1] timed out while sending RCPT TO"),
])
def test_diagnostic_code_takes_the_smtp_reply(reply, code):
    _, [fields] = report(failure([bob(last_reply=reply)]))
    assert fields["Diagnostic-Code"] == code


@pytest.mark.parametrize("relay, remote", [
    ("mx.example.net[192.0.2.25]:25", "dns; mx.example.net"),
    ("mx6.example.net[2001:db8::25]:25", "dns; mx6.example.net"),
    ("[192.0.2.25]:2525", "dns; [192.0.2.25]"),
    ("relay.example.net:587", "dns; relay.example.net"),
    ("none", None),
    ("local", None),
    ("", None),
])
def test_remote_mta_names_the_host_of_the_relay(relay, remote):
    _, [fields] = report(failure([bob(relay=relay)]))
    assert fields.get("Remote-MTA") == remote


@pytest.mark.parametrize("orcpt, original", [
    ("rfc822;bob+2Bsales@example.net", "rfc822; bob+sales@example.net"),
    ("rfc822;bob@example.net", "rfc822; bob@example.net"),
    ("RFC822; x+3Dy@example.net", "RFC822; x=y@example.net"),
    ("bob@example.net", "rfc822; bob@example.net"),
])
def test_original_recipient_is_the_decoded_orcpt(orcpt, original):
    _, [fields] = report(failure([bob(orcpt=orcpt)]))
    assert fields["Original-Recipient"] == original


@pytest.mark.parametrize("notice, action, status", [
    (failure_notice, "failed", "5.0.0"),
    (delay_notice, "delayed", "4.0.0"),
    (success_notice, "relayed", "2.0.0"),
])
def test_status_defaults_by_action(notice, action, status):
    recipients = [bob(dsn=""), carol(dsn="not a status")]
    raw = notice(envelope(recipients), recipients, ORIGINAL, CONFIG, NOW)
    _, blocks = report(raw)
    assert [(b["Action"], b["Status"]) for b in blocks] == [(action, status)] * 2


def test_several_recipients_each_get_a_block_and_a_line():
    raw = failure([bob(), carol()])
    _, blocks = report(raw)
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@example.net", "rfc822; carol@example.com"]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.4.4"]
    text = human(raw)
    assert f"<bob@example.net>: {REJECTED}" in text
    assert f"<carol@example.com>: {NOT_FOUND}" in text
    assert text.startswith("This is the mail system at host mx.example.org. I'm sorry to "
                           "have to inform you that your message could not be delivered")


def test_human_text_is_wrapped_as_postfix_wraps_it():
    lines = parts(failure())[0].get_content().splitlines()
    start = lines.index("<bob@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1")
    assert lines[start + 1:start + 3] == [
        "    <bob@example.net>: Recipient address rejected: User unknown in virtual",
        "    mailbox table (in reply to RCPT TO command)"]


def test_long_report_fields_are_folded_and_unfold_to_the_same_value():
    raw = failure()
    section = raw.split(b"message/delivery-status\r\n\r\n")[1].split(b"\r\n--")[0]
    assert max(len(line) for line in section.split(b"\r\n")) <= 78
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: Recipient address\r\n " \
        in section


def test_ret_full_returns_the_whole_message():
    for ret in ("FULL", ""):  # not given: Postfix's default, the whole message
        original = parts(failure(ret=ret))[2]
        assert original.get_content_type() == "message/rfc822"
        returned = original.get_payload()[0]
        assert returned["Subject"] == "Quarterly report"
        assert returned.get_content() == "Hello Bob,\r\n\r\nthe figures are attached.\r\n"


def test_ret_hdrs_returns_the_header_section_only():
    original = parts(failure(ret="HDRS"))[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Undelivered Message Headers"
    headers = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert original.get_payload(decode=True) == headers


def test_original_larger_than_bounce_size_limit_returns_headers_only():
    config = Config(myhostname="mx.example.org", bounce_size_limit=len(ORIGINAL) - 1)
    original = parts(failure(config=config))[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original.get_payload(decode=True) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    config = Config(myhostname="mx.example.org", bounce_size_limit=len(ORIGINAL))
    assert parts(failure(config=config))[2].get_content_type() == "message/rfc822"


@pytest.mark.parametrize("limit", [70, 100, 120, 160])
def test_header_section_past_the_limit_is_cut_between_whole_fields(limit):
    config = Config(myhostname="mx.example.org", bounce_size_limit=limit)
    returned = parts(failure(config=config))[2].get_payload(decode=True)
    assert len(returned) <= limit
    assert ORIGINAL.startswith(returned)
    after = ORIGINAL[len(returned):]
    assert after[:1] not in (b" ", b"\t")  # no field cut in the middle of a folded line


def test_bounce_size_limit_zero_means_no_limit():
    config = Config(myhostname="mx.example.org", bounce_size_limit=0)
    big = ORIGINAL + b"x" * 100_000 + b"\r\n"
    original = parts(failure(content=big, config=config))[2]
    assert original.get_content_type() == "message/rfc822"


def test_8bit_original_is_labelled_8bit():
    content = ORIGINAL.replace(b"Hello Bob", b"Gr\xc3\xbc\xc3\x9fe Bob")
    raw = failure(content=content)
    assert parse(raw)["Content-Transfer-Encoding"] == "8bit"
    text, status, original = parts(raw)
    assert original["Content-Transfer-Encoding"] == "8bit"
    assert text["Content-Transfer-Encoding"] is None
    assert status["Content-Transfer-Encoding"] is None
    assert content in raw


def test_7bit_original_has_no_transfer_encoding():
    raw = failure()
    assert b"Content-Transfer-Encoding" not in raw


def test_8bit_headers_only_part_is_labelled_when_the_headers_are_8bit():
    content = ORIGINAL.replace(b"Quarterly report", b"Bericht f\xc3\xbcr Q1")
    original = parts(failure(content=content, ret="HDRS"))[2]
    assert original["Content-Transfer-Encoding"] == "8bit"
    content = ORIGINAL.replace(b"Hello Bob", b"Gr\xc3\xbc\xc3\x9fe Bob")
    raw = failure(content=content, ret="HDRS")  # the 8-bit body is not returned
    assert b"Content-Transfer-Encoding" not in raw


UTF8_ORIGINAL = ("From: Jörg <jörg@bücher.test>\r\nTo: René <rené@example.net>\r\n"
                 "Subject: Grüße\r\n\r\nblåbærsyltetøy\r\n").encode()


def utf8_failure(**changes):
    recipients = [bob(address="rené@example.net", orcpt="utf-8;rené@example.net"),
                  carol()]
    return failure(recipients, UTF8_ORIGINAL, **({"sender": "jörg@bücher.test",
                                                   "smtputf8": True} | changes))


def test_notice_of_an_smtputf8_message_is_global():
    """RFC 6533, as Postfix's bounce(8) for a message sent with SMTPUTF8: message/global-
    delivery-status with "utf-8" address types for non-ASCII addresses only, and the original
    returned as message/global; To: and the text keep the UTF-8 addresses readable."""
    raw = utf8_failure()
    message = parse(raw)
    assert message["To"] == "jörg@bücher.test"
    assert message["Content-Transfer-Encoding"] == "8bit"
    text, status, original = parts(raw)
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    block = raw.split(b"Content-Type: message/global-delivery-status")[1].split(b"\r\n--")[0]
    fields = block.decode().split("\r\n")
    assert "X-Tern-Sender: utf-8; jörg@bücher.test" in fields
    assert "Final-Recipient: utf-8; rené@example.net" in fields
    assert "Original-Recipient: utf-8; rené@example.net" in fields
    assert "Final-Recipient: rfc822; carol@example.com" in fields  # ASCII stays rfc822
    assert "<rené@example.net>: host mx.example.net[192.0.2.25] said:" in human(raw)
    assert text.get_content_charset() == "utf-8"
    assert original.get_content_type() == "message/global"
    returned = original.get_payload()[0]  # the stdlib reads message/global as a message
    assert returned["Subject"] == "Grüße"
    assert UTF8_ORIGINAL in raw
    raw = utf8_failure(ret="HDRS")
    hdrs = parts(raw)[2]
    assert hdrs.get_content_type() == "message/global-headers"
    head = UTF8_ORIGINAL.split(b"\r\n\r\n")[0]
    assert head in raw and "blåbær".encode() not in raw


def test_notice_of_a_message_without_smtputf8_keeps_rfc822_types():
    """Without SMTPUTF8 (Postfix: only a request makes it "global"), even a non-ASCII address
    from a non-SMTP source keeps the RFC 3464 types."""
    raw = utf8_failure(smtputf8=False)
    text, status, original = parts(raw)
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "message/rfc822"
    assert "Final-Recipient: rfc822; rené@example.net".encode() in raw


def test_delay_notice():
    recipients = [bob(status="deferred", dsn="4.2.2",
                      last_reply="host mx.example.net[192.0.2.25] said: 452 4.2.2 Mailbox "
                                 "full (in reply to RCPT TO command)")]
    now = ARRIVAL + 4 * 3600
    raw = delay_notice(envelope(recipients), recipients, ORIGINAL, CONFIG, now)
    assert parse(raw)["Subject"] == "Delayed Mail (still being retried)"
    _, [fields] = report(raw)
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.2.2"
    assert fields["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full"
    assert fields["Will-Retry-Until"] == rfc5322_date(ARRIVAL + CONFIG.maximal_queue_lifetime)
    text = human(raw)
    assert "THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE." in text
    assert "could not be delivered for more than 4 hour(s)." in text
    assert "It will be retried until it is 5 day(s) old." in text
    assert "<bob@example.net>: host mx.example.net[192.0.2.25] said: 452 4.2.2" in text


def test_delay_and_success_notices_return_headers_only_whatever_ret_says():
    recipients = [bob()]
    env = envelope(recipients, ret="FULL")
    delayed = parts(delay_notice(env, recipients, ORIGINAL, CONFIG, NOW))[2]
    succeeded = parts(success_notice(env, recipients, ORIGINAL, CONFIG, NOW))[2]
    assert delayed.get_content_type() == succeeded.get_content_type() == "text/rfc822-headers"
    assert delayed["Content-Description"] == "Undelivered Message Headers"
    assert succeeded["Content-Description"] == "Message Headers"
    assert b"Hello Bob" not in delayed.get_payload(decode=True)


def test_success_notice():
    recipients = [bob(status="sent", dsn="2.0.0", last_reply="250 2.0.0 Ok: queued as 4XyZ")]
    raw = success_notice(envelope(recipients), recipients, ORIGINAL, CONFIG, NOW)
    assert parse(raw)["Subject"] == "Successful Mail Delivery Report"
    _, [fields] = report(raw)
    assert (fields["Action"], fields["Status"]) == ("relayed", "2.0.0")
    assert fields["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4XyZ"
    assert "Will-Retry-Until" not in fields
    text = human(raw)
    assert "Your message was successfully delivered to the destination(s)" in text
    assert ("<bob@example.net>: delivery via mx.example.net[192.0.2.25]:25: "
            "250 2.0.0 Ok: queued as 4XyZ") in text


@pytest.mark.parametrize("action", ["delivered", "expanded"])
def test_success_notice_takes_the_action(action):
    recipients = [bob(status="sent", dsn="2.0.0", relay="local", last_reply="delivered")]
    raw = success_notice(envelope(recipients), recipients, ORIGINAL, CONFIG, NOW, action=action)
    assert report(raw)[1][0]["Action"] == action


def test_success_notice_refuses_an_action_that_is_not_a_success():
    with pytest.raises(ValueError):
        success_notice(envelope([bob()]), [bob()], ORIGINAL, CONFIG, NOW, action="failed")


def test_a_notice_needs_recipients():
    with pytest.raises(ValueError):
        failure_notice(envelope([]), [], ORIGINAL, CONFIG, NOW)


def test_remote_text_cannot_add_header_fields_or_lines():
    sneaky = bob(last_reply="550 no\r\nBcc: victim@example.com\r\n\r\nbody",
                 orcpt="rfc822;x+0D+0ABcc:+20y@example.com")
    raw = failure([sneaky], envid="a+0D+0AX-Evil:+201")
    assert b"\r\nBcc:" not in raw and b"\r\nX-Evil:" not in raw
    fields, [block] = report(raw)
    assert fields["Original-Envelope-Id"] == "a??X-Evil: 1"
    assert block["Diagnostic-Code"] == "smtp; 550 no??Bcc: victim@example.com????body"
    assert block["Original-Recipient"] == "rfc822; x??Bcc: y@example.com"


def test_to_quotes_a_local_part_that_is_not_a_dot_atom():
    raw = failure(sender="john doe@example.org")
    assert b'\r\nTo: "john doe"@example.org\r\n' in raw
    raw = failure(sender='"john doe"@example.org')
    assert b'\r\nTo: "john doe"@example.org\r\n' in raw


def test_module_is_pure():
    """No I/O library comes with engine.bounce (nor email, which brings socket along)."""
    code = ("import sys, engine.bounce; print(sorted({'asyncio', 'socket', 'ssl', 'lmdb', "
            "'dns', 'selectors', 'email'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_whole_failure_notice_matches_the_golden_file(utc):
    """tests/data/bounce_failure.ref, reviewed against RFC 3464 §6's examples. Kept with LF
    line ends (readable, diff-able); the notice has CRLF."""
    raw = failure([bob(), carol()])
    assert raw == GOLDEN.read_bytes().replace(b"\n", b"\r\n")
