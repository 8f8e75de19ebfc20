"""cleanup: trace and missing headers, and the size limit enforced while content streams."""

import pytest

from engine.cleanup import MessageBuilder, Origin, RecipientRequest, neuter_helo, received_header


def build(chunks, *, size_limit=10_000, recipients=("rcpt@example.net",), **dsn):
    builder = MessageBuilder(
        queue_id="QID123", sender="s@example.org", recipients=list(recipients),
        origin=Origin(client_ip="127.0.0.1", helo="client.test", esmtp=True),
        hostname="mx.example.test", size_limit=size_limit, clock=lambda: 1_800_000_000.0,
        **dsn)
    for chunk in chunks:
        builder.write(chunk)
    return builder


def content(builder):
    return b"".join(builder.finish().content)


@pytest.mark.parametrize("helo, kept", [
    ("client.test", "client.test"),
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),  # ":" is not Postfix's to neuter
    ("trusted.example (localhost [10.0.0.1]) by x;",
     "trusted.example??localhost?[10.0.0.1]??by?x?"),
    ('a<b>c"d\\e@f', "a?b?c?d?e?f"),
    ("tab\there\x00nul", "tab?here?nul"),
    ("caf\u00e9.example", "caf\u00e9.example"),  # UTF-8 text stays (smtputf8_enable)
    ("nel\u0085del\x7f", "nel?del?"),
    ("raw\udcffbyte", "raw?byte"),  # a non-UTF-8 byte (surrogateescape)
])
def test_helo_names_are_neutered_as_postfix_s(helo, kept):
    assert neuter_helo(helo) == kept


def test_received_header_comes_first_with_queue_id_and_recipient():
    text = content(build([b"Subject: x\r\nMessage-ID: <a@b>\r\nDate: now\r\n\r\nbody\r\n"]))
    first = text.split(b"\r\n")[:3]
    assert first[0] == b"Received: from client.test (unknown [127.0.0.1])"
    assert first[1] == b"\tby mx.example.test (Tern) with ESMTP id QID123"
    assert first[2].startswith(b"\tfor <rcpt@example.net>; ")


def test_received_records_tls_version_and_cipher_as_postfix():
    origin = Origin(client_ip="127.0.0.1", helo="client.test", esmtp=True,
                    tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    lines = received_header(origin, "mx.example.test", "QID1", ["a@x.test"], 0).split(b"\r\n")
    assert lines[:3] == [
        b"Received: from client.test (unknown [127.0.0.1])",
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))",
        b"\tby mx.example.test (Tern) with ESMTPS id QID1"]


def test_received_omits_for_clause_with_several_recipients():
    text = content(build([b"\r\nbody\r\n"], recipients=("a@x.test", "b@x.test")))
    assert b"\tfor <" not in text


def test_existing_message_id_and_date_are_kept_not_duplicated():
    builder = build([b"Message-ID: <keep@x>\r\nDate: Sat, 1 Jan 2000 00:00:00 +0000\r\n\r\nb\r\n"])
    text = content(builder)
    assert text.lower().count(b"message-id:") == 1 and text.lower().count(b"\ndate:") == 1
    assert builder.message_id == "<keep@x>"


@pytest.mark.parametrize("split", [1, 5, 17, 1000])
def test_missing_headers_are_added_at_end_of_header_section(split):
    raw = b"Subject: hello\r\nX-Folded: a\r\n b\r\n\r\nbody line\r\nMessage-ID: not a header\r\n"
    builder = build([raw[i:i + split] for i in range(0, len(raw), split)])
    text = content(builder)
    head, _, body = text.partition(b"\r\n\r\n")
    assert body == b"body line\r\nMessage-ID: not a header\r\n"
    assert b"\r\nMessage-Id: <20270115080000.QID123@mx.example.test>" in head or \
        b"\r\nMessage-Id: <" in head
    assert b"\r\nDate: " in head
    assert head.index(b"X-Folded") < head.index(b"Message-Id")
    assert builder.message_id.endswith(".QID123@mx.example.test>")


def test_body_without_headers_gets_a_separating_blank_line():
    text = content(build([b"just a body line\r\n"]))
    head, _, body = text.partition(b"\r\n\r\n")
    assert body == b"just a body line\r\n"
    assert b"Message-Id:" in head and b"Date:" in head


def test_size_limit_enforced_while_streaming_and_content_dropped():
    builder = build([b"x" * 600 + b"\r\n", b"y" * 600 + b"\r\n"], size_limit=1000)
    assert builder.too_big
    assert builder._chunks == []  # nothing of the over-size message is kept


def test_size_within_limit_is_accepted():
    builder = build([b"\r\n" + b"x" * 900 + b"\r\n"], size_limit=1000)
    assert not builder.too_big
    assert builder.finish().envelope.size > 900


def test_duplicate_recipients_are_removed():
    builder = build([b"\r\nbody\r\n"], recipients=("a@x.test", "b@x.test", "a@x.test"))
    assert [r.address for r in builder.finish().envelope.recipients] == ["a@x.test", "b@x.test"]


def test_dsn_request_lands_in_the_envelope_and_recipients():
    recipients = (RecipientRequest("a@x.test", notify="SUCCESS,FAILURE", orcpt="rfc822;a@x.test"),
                  "b@x.test", RecipientRequest("c@x.test", notify="NEVER"))
    envelope = build([b"\r\nbody\r\n"], recipients=recipients, ret="HDRS",
                     envid="QQ+2B1").finish().envelope
    assert (envelope.ret, envelope.envid) == ("HDRS", "QQ+2B1")
    assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
        ("a@x.test", "SUCCESS,FAILURE", "rfc822;a@x.test"), ("b@x.test", "", ""),
        ("c@x.test", "NEVER", "")]


def test_without_a_dsn_request_the_fields_stay_empty():
    envelope = build([b"\r\nbody\r\n"]).finish().envelope
    assert (envelope.ret, envelope.envid) == ("", "")
    assert [(r.notify, r.orcpt) for r in envelope.recipients] == [("", "")]


def test_duplicate_recipient_keeps_the_first_dsn_request():
    recipients = (RecipientRequest("a@x.test", notify="NEVER", orcpt="rfc822;first@x.test"),
                  RecipientRequest("a@x.test", notify="SUCCESS", orcpt="rfc822;second@x.test"),
                  "a@x.test")
    builder = build([b"\r\nbody\r\n"], recipients=recipients)
    (recipient,) = builder.finish().envelope.recipients
    assert (recipient.notify, recipient.orcpt) == ("NEVER", "rfc822;first@x.test")
    assert b"\tfor <a@x.test>; " in b"".join(builder._chunks)


def test_date_is_rfc5322_and_matches_email_parser():
    from email.utils import parsedate_to_datetime

    from engine.cleanup import rfc5322_date

    stamp = rfc5322_date(1_800_000_000.0)
    assert parsedate_to_datetime(stamp).timestamp() == 1_800_000_000.0
    assert stamp[3:5] == ", "


def test_inject_queues_tern_made_mail_through_the_same_path():
    import asyncio
    import io

    from engine.cleanup import Cleanup
    from engine.config import Config
    from engine.log import Maillog
    from engine.spool.memory import MemorySpool

    spool, queued = MemorySpool(), []
    cleanup = Cleanup(spool, Maillog("mx.test", stream=io.StringIO()),
                      Config(myhostname="mx.test", message_size_limit=10), queued.append)
    envelope = asyncio.run(cleanup.inject("", ["a@example.org"], b"Subject: bounce\r\n\r\n"
                                          + b"x" * 100 + b"\r\n"))
    assert queued == [envelope] and envelope.sender == ""
    content = spool.content(envelope.queue_id)
    assert content.startswith(b"Received: from localhost (localhost [127.0.0.1])")
    assert b"with local id " + envelope.queue_id.encode() in content
    assert b"Subject: bounce\r\nMessage-Id: <" in content  # over the size limit: still queued
    from engine.cleanup import RecipientRequest

    forwarded = asyncio.run(cleanup.inject(
        "a@example.org", [RecipientRequest("b@example.net", "FAILURE", "rfc822;c@example.org")],
        b"Subject: fw\r\n\r\nx\r\n", smtputf8=True, ret="HDRS", envid="E+2B1"))
    assert (forwarded.ret, forwarded.envid, forwarded.smtputf8) == ("HDRS", "E+2B1", True)
    (recipient,) = forwarded.recipients
    assert (recipient.address, recipient.notify, recipient.orcpt) == (
        "b@example.net", "FAILURE", "rfc822;c@example.org")


@pytest.mark.parametrize("fields, expected", [
    ({}, "SMTP"),
    ({"esmtp": True}, "ESMTP"),
    ({"esmtp": True, "tls": "TLSv1.3 with cipher X"}, "ESMTPS"),
    ({"esmtp": True, "sasl_username": "u"}, "ESMTPA"),
    ({"esmtp": True, "tls": "TLSv1.3", "sasl_username": "u"}, "ESMTPSA"),
    ({"esmtp": True, "tls": "TLSv1.3", "smtputf8": True}, "UTF8SMTPS"),
    ({"local_protocol": "local"}, "local"),
])
def test_origin_protocol_is_rfc3848_keyword(fields, expected):
    assert Origin(**fields).protocol == expected


@pytest.mark.parametrize("received, looping", [(48, False), (49, True), (60, True)])
def test_received_headers_reaching_hopcount_limit_mark_a_loop(received, looping):
    # Postfix's cleanup counts every Received: header, the one this hop adds included
    head = b"".join(b"Received: from hop%d.test by x.test; now\r\n" % i for i in range(received))
    builder = build([head[:50], head[50:] + b"Subject: x\r\n\r\nbody\r\n"], size_limit=0,
                    hopcount_limit=50)
    builder.finish()
    assert builder.too_many_hops is looping


def test_received_in_the_body_is_no_hop():
    body = b"".join(b"Received: from hop%d.test\r\n" % i for i in range(60))
    builder = build([b"Subject: x\r\n\r\n" + body], size_limit=0, hopcount_limit=50)
    builder.finish()
    assert builder.too_many_hops is False
