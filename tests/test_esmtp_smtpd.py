"""ESMTP extensions through the smtpd adapter over real loopback sockets: BDAT chunks answered
once the spool has committed (raw sockets: smtplib has no BDAT), SMTPUTF8 from smtplib kept in
the LMDB spool, and both kinds of message relayed intact by a real `tern serve` to Postfix's
smtp-sink; swaks reads the EHLO offer."""

import asyncio
import contextlib
import re
import shutil
import smtplib
import socket
import subprocess

import pytest
from test_smtpd_session import GatedSpool, finish, read_replies, serve

from engine.spool.lmdb_spool import LmdbSpool
from engine.spool.memory import MemorySpool

TXN = b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
CHUNKED_QUEUED = re.compile(r"250 2\.0\.0 Ok: (\d+) bytes queued as (\S+)")


# -- the adapter, in process ---------------------------------------------------------------------

FIRST, LAST = b"Subject: c\r\n\r\n.a\r\n", b".\r\nend\r\n"


def test_bdat_last_is_answered_only_after_the_spool_commit():
    async def scenario():
        spool = GatedSpool()
        server, reader, writer, log = await serve(spool)
        writer.write(TXN + b"BDAT %d\r\n" % len(FIRST) + FIRST + b"BDAT %d LAST\r\n" % len(LAST)
                     + LAST)
        before = await read_replies(reader, 4)  # EHLO, MAIL, RCPT, the first chunk
        early = None
        with contextlib.suppress(TimeoutError):
            early = await asyncio.wait_for(reader.readline(), 0.3)
        queued_before_commit = spool.envelopes()
        spool.gate.set()
        (last,) = await read_replies(reader, 1)
        writer.write(b"QUIT\r\n")
        (bye,) = await read_replies(reader, 1)
        await finish(server, writer)
        return before, early, queued_before_commit, last, bye, spool, log.getvalue()

    before, early, queued_before_commit, last, bye, spool, log = asyncio.run(scenario())
    assert before[-1] == f"250 2.0.0 Ok: {len(FIRST)} bytes"
    assert early is None and queued_before_commit == []
    size, queue_id = CHUNKED_QUEUED.fullmatch(last).groups()
    assert int(size) == len(FIRST + LAST)
    (envelope,) = spool.envelopes()
    assert envelope.queue_id == queue_id
    content = spool.content(queue_id)
    assert content.startswith(b"Received: from c.test") and b"with ESMTP id" in content
    assert b"\r\nSubject: c\r\n" in content
    assert content.endswith(b"\r\n\r\n.a\r\n.\r\nend\r\n")  # as sent: no unstuffing
    assert bye == "221 2.0.0 Bye"
    assert "bdat=2" in log


def test_bdat_over_the_size_limit_queues_nothing_and_the_session_goes_on():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, _ = await serve(spool, message_size_limit=1000)
        writer.write(TXN + b"BDAT 600\r\n" + b"x" * 600 + b"BDAT 600\r\n" + b"y" * 600
                     + b"BDAT 1 LAST\r\nz" + TXN[13:] + b"BDAT 3 LAST\r\nabc")
        replies = await read_replies(reader, 9)
        await finish(server, writer)
        return replies, spool

    replies, spool = asyncio.run(scenario())
    assert replies[3:6] == ["250 2.0.0 Ok: 600 bytes", "552 5.3.4 Chunk exceeds message size limit",
                            "551 5.0.0 Discarded 1 bytes after earlier error"]
    assert CHUNKED_QUEUED.fullmatch(replies[-1])
    (envelope,) = spool.envelopes()
    assert spool.content(envelope.queue_id).endswith(b"\r\n\r\nabc")


def test_rset_after_chunks_queues_nothing():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, _ = await serve(spool)
        writer.write(TXN + b"BDAT 4\r\nabcdRSET\r\nNOOP\r\n")
        replies = await read_replies(reader, 6)
        await finish(server, writer)
        return replies, spool.envelopes()

    replies, queued = asyncio.run(scenario())
    assert replies[-3:] == ["250 2.0.0 Ok: 4 bytes", "250 2.0.0 Ok", "250 2.0.0 Ok"]
    assert queued == []


def test_smtputf8_and_8bitmime_are_kept_in_the_lmdb_spool(tmp_path):
    """smtplib sends the UTF-8 addresses (its SMTPUTF8 mail option); the flag and the body
    type survive a reopening of the spool; Received: says UTF8SMTP only for that message."""
    body = "Subject: grüße\r\n\r\nblåbærsyltetøy\r\n".encode()

    async def scenario():
        spool = LmdbSpool(tmp_path / "spool", commit_window=0.005)
        server, reader, writer, _ = await serve(spool)
        writer.close()
        port = server.sockets[0].getsockname()[1]

        def client():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                assert smtp.has_extn("smtputf8") and smtp.has_extn("chunking")
                first = smtp.sendmail("jörg@bücher.test", ["用户@例子.广告"], body,
                                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
                second = smtp.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\n")
                return first, second

        answers = await asyncio.get_running_loop().run_in_executor(None, client)
        server.close()
        await server.wait_closed()
        await spool.drain()
        spool.close()
        return answers

    assert asyncio.run(scenario()) == ({}, {})
    reopened = LmdbSpool(tmp_path / "spool")
    try:
        by_sender = {e.sender: e for e in reopened.envelopes()}
        utf8, ascii_ = by_sender["jörg@bücher.test"], by_sender["a@example.org"]
        assert utf8.smtputf8 is True and utf8.body_8bit is True
        assert [r.address for r in utf8.recipients] == ["用户@例子.广告"]
        assert ascii_.smtputf8 is False and ascii_.body_8bit is False
        assert b"with UTF8SMTP id " in reopened.content(utf8.queue_id)
        assert reopened.content(utf8.queue_id).endswith(body.split(b"\r\n\r\n")[1])
        assert b"with ESMTP id " in reopened.content(ascii_.queue_id)
    finally:
        reopened.close()


def test_unicode_address_without_smtputf8_is_553_over_smtplib():
    async def scenario():
        spool = MemorySpool()
        server, _, writer, _ = await serve(spool)
        writer.close()
        port = server.sockets[0].getsockname()[1]

        def client():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.command_encoding = "utf-8"  # send the address without declaring SMTPUTF8
                return smtp.mail("jörg@bücher.test"), smtp.noop()

        answers = await asyncio.get_running_loop().run_in_executor(None, client)
        server.close()
        await server.wait_closed()
        return answers, spool.envelopes()

    (mail, noop), queued = asyncio.run(scenario())
    assert mail == (553, b"5.6.7 Must declare SMTPUTF8 to send unicode address")
    assert noop[0] == 250 and queued == []


# -- a real tern serve, raw sockets, and smtp-sink as the next hop --------------------------------

def chat(address, data: bytes, finals: int) -> list[bytes]:
    """Send ``data`` in one write; read until ``finals`` final reply lines came (bounded)."""
    with socket.create_connection(address, timeout=10) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        raw.sendall(data)
        lines = []
        while sum(line[3:4] == b" " for line in lines) < finals:
            line = reader.readline()
            assert line, f"connection closed after {lines}"
            lines.append(line.rstrip(b"\r\n"))
        return [line for line in lines if line[3:4] == b" "]


def test_pipelined_bdat_message_is_relayed_intact(tern, smtp_sink):
    sink = smtp_sink()
    # the whole dialogue in one write, EHLO included: improper pipelining, allowed here
    server = tern(relayhost=sink.nexthop, smtpd_forbid_unauth_pipelining=False)
    body = (b"Subject: chunked\r\n\r\n.leading dot\r\n.\r\nthe line above is a lone dot\r\n"
            + b"0123456789" * 3000 + b"\r\nlast line\r\n")
    cut = [0, 7, 20, 5000, len(body)]
    chunks = [body[a:b] for a, b in zip(cut, cut[1:], strict=False)]
    stream = (TXN + b"".join(b"BDAT %d\r\n" % len(c) + c for c in chunks)
              + b"BDAT 0 LAST\r\nQUIT\r\n")
    replies = chat(server.address, stream, finals=9)
    assert replies[3:7] == [b"250 2.0.0 Ok: %d bytes" % len(c) for c in chunks]
    size, queue_id = CHUNKED_QUEUED.fullmatch(replies[7].decode()).groups()
    assert int(size) == len(body) and replies[8] == b"221 2.0.0 Bye"
    (message,) = sink.wait_messages(1)
    assert (message.sender, message.recipients) == ("a@example.org", ("b@example.net",))
    assert b"\r\nSubject: chunked\r\n" in message.content
    assert message.content.endswith(b"\r\n" + body.split(b"\r\n", 1)[1])  # after Date: …
    assert f"with ESMTP id {queue_id}".encode() in message.content
    assert "bdat=5" in server.wait_log(f"{queue_id}: removed")


def as_sink_dumps(address: str) -> str:
    return "".join(chr(b) if b < 128 else "?" for b in address.encode())


def test_smtputf8_message_is_relayed_intact(tern, smtp_sink):
    """smtp-sink offers no SMTPUTF8: a message with UTF-8 addresses bounces there with 5.6.7
    (issue 5, as Postfix), and so does its bounce to the UTF-8 sender (a notice about an
    SMTPUTF8 message is one too); one that only asked for SMTPUTF8 goes on intact without it."""
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    body = "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\nblåbærsyltetøy ☃\r\n".encode()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.sendmail("jörg@bücher.test", ["用户@例子.广告"], body,
                               mail_options=["SMTPUTF8"]) == {}
    log = server.wait_log("status=bounced", 2)  # the message, then its notice to jörg
    said = ("dsn=5.6.7, status=bounced (SMTPUTF8 is required, but was not offered by host "
            "127.0.0.1[127.0.0.1])")
    assert log.count(said) == 2
    assert "to=<jörg@bücher.test>, relay=127.0.0.1[127.0.0.1]" in log
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.sendmail("jorg@bucher.test", ["user@example.test"], body,
                               mail_options=["SMTPUTF8"]) == {}
    server.wait_log("status=sent")
    (message,) = sink.wait_messages(1)  # nothing from <>: the notice could not go there
    assert message.sender == "jorg@bucher.test"
    assert message.recipients == ("user@example.test",)
    assert b"(Tern) with UTF8SMTP id " in message.content
    assert message.content.endswith(body.split(b"\r\n\r\n", 1)[1])


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_sees_the_extensions(tern):
    server = tern(message_size_limit=5000000)
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--quit-after", "EHLO", "--helo",
         "swaks.test"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    offered = re.findall(r"<-  250[ -](\S+(?: \d+)?)", result.stdout)
    assert {"PIPELINING", "SIZE 5000000", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8",
            "CHUNKING"} <= set(offered)


def test_utf8_and_invalid_utf8_commands_over_a_socket_crash_nothing():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, log = await serve(spool)
        writer.write("EHLO bücher.test\r\nVRFY jörg\r\nMAIL FROM:<a@example.org>\r\n"
                     "RCPT TO:<b@example.net>\r\nRCPT TO:<ü@example.net>\r\n".encode()
                     + b"NOOP \xff\xfe\r\nBDAT 3 LAST\r\nabcQUIT\r\n")
        replies = await read_replies(reader, 8)
        await finish(server, writer)
        return replies, spool, log.getvalue()

    replies, spool, log = asyncio.run(scenario())
    assert replies[1:] == [
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        "250 2.1.0 Ok", "250 2.1.5 Ok", "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
        "500 5.5.2 Error: bad UTF-8 syntax", replies[6], "221 2.0.0 Bye"]
    (envelope,) = spool.envelopes()
    assert CHUNKED_QUEUED.fullmatch(replies[6]).group(2) == envelope.queue_id
    assert spool.content(envelope.queue_id).startswith(
        "Received: from bücher.test (unknown [127.0.0.1])".encode())
    assert "disconnect from unknown[127.0.0.1] ehlo=1 vrfy=1 mail=1 rcpt=2 bdat=1 quit=1" in log


def test_malformed_bdat_is_521_then_closed_without_reading_content_as_commands():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, log = await serve(spool)
        writer.write(TXN + b"BDAT 12x LAST\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
        replies = await read_replies(reader, 4)
        rest = await asyncio.wait_for(reader.read(), 5)  # the server closed: EOF
        await finish(server, writer)
        return replies, rest, log.getvalue()

    replies, rest, log = asyncio.run(scenario())
    assert replies[-1] == "521 5.5.4 Syntax: BDAT count [LAST]" and rest == b""
    assert "lost connection" not in log
    assert "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 bdat=1 commands=4" in log


def test_dsn_request_of_a_bdat_message_is_queued_with_it():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, _ = await serve(spool)
        writer.write("EHLO c.test\r\nMAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B1 SMTPUTF8\r\n"
                     "RCPT TO:<b@example.net> NOTIFY=SUCCESS,DELAY ORCPT=utf-8;jörg@bücher.test\r\n"
                     "BDAT 2 LAST\r\nhi".encode())
        replies = await read_replies(reader, 4)
        await finish(server, writer)
        return replies, spool.envelopes()

    replies, (envelope,) = asyncio.run(scenario())
    assert CHUNKED_QUEUED.fullmatch(replies[-1])
    assert (envelope.ret, envelope.envid, envelope.smtputf8) == ("HDRS", "QQ+2B1", True)
    (recipient,) = envelope.recipients
    assert (recipient.notify, recipient.orcpt) == ("SUCCESS,DELAY", "utf-8;jörg@bücher.test")
