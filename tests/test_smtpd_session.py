"""The smtpd adapter over a real loopback socket: the durability contract, storage errors as
4xx, and the idle timeout. The spool is the in-memory one, gated to control commit timing."""

import asyncio
import contextlib
import io

import pytest

from engine.cleanup import Cleanup
from engine.config import Config
from engine.log import Maillog
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool import SpoolFull
from engine.spool.lmdb_spool import LmdbSpool
from engine.spool.memory import MemorySpool

TRANSACTION = (b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
               b"DATA\r\n")


server_sessions: set = set()  # the sessions of the server under test


class GatedSpool(MemorySpool):
    """Commits only when the test opens the gate; or fails with a given error."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.error = error

    async def enqueue(self, message):
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        await super().enqueue(message)


async def serve(spool, **config):
    log = io.StringIO()
    # these clients write a whole transaction at once (EHLO … DATA): improper pipelining, which
    # tests/test_abuse_pipelining.py covers; here it is allowed so they can test the rest
    config.setdefault("smtpd_forbid_unauth_pipelining", False)
    config = Config(myhostname="mx.test", **config)
    maillog = Maillog("mx.test", stream=log)
    context = SmtpdContext(config=config, cleanup=Cleanup(spool, maillog, config),
                           maillog=maillog, sessions=server_sessions)
    server = await asyncio.get_running_loop().create_server(
        lambda: SmtpdProtocol(context), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()  # greeting
    return server, reader, writer, log


async def finish(server, writer):
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def read_replies(reader, count):
    final = []
    while len(final) < count:
        line = await asyncio.wait_for(reader.readline(), 5)
        if line[3:4] == b" ":
            final.append(line.decode().rstrip())
    return final


def test_queued_reply_waits_for_the_spool_commit():
    async def scenario():
        spool = GatedSpool()
        server, reader, writer, _ = await serve(spool)
        writer.write(TRANSACTION)
        await read_replies(reader, 4)
        writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        early = None
        with contextlib.suppress(TimeoutError):
            early = await asyncio.wait_for(reader.readline(), 0.3)
        assert spool.envelopes() == []
        spool.gate.set()
        (reply,) = await read_replies(reader, 1)
        stored = spool.envelopes()
        await finish(server, writer)
        return early, reply, stored

    early, reply, stored = asyncio.run(scenario())
    assert early is None  # nothing was said before the commit
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert [e.queue_id for e in stored] == [reply.rsplit(" ", 1)[1]]


@pytest.mark.parametrize("error, reply, logged", [
    (SpoolFull("map full"), "452 4.3.1 Insufficient system storage",
     "reject: END-OF-MESSAGE from unknown[127.0.0.1]: 452 4.3.1"),
    (OSError("disk on fire"), "451 4.3.0 Error: queue file write error",
     "queue file write error: disk on fire"),
])
def test_storage_failure_is_4xx_never_250_and_the_session_goes_on(error, reply, logged):
    async def scenario():
        spool = GatedSpool(error=error)
        spool.gate.set()
        server, reader, writer, log = await serve(spool)
        writer.write(TRANSACTION + b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
        replies = await read_replies(reader, 6)
        await finish(server, writer)
        return replies, log.getvalue()

    replies, log = asyncio.run(scenario())
    assert replies[-2:] == [reply, "250 2.0.0 Ok"]
    assert logged in log


def test_dsn_parameters_are_queued_with_the_message():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, _ = await serve(spool)
        writer.write(b"EHLO c.test\r\nMAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B314159\r\n"
                     b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.test\r\n"
                     b"RCPT TO:<c@example.net>\r\n"
                     b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        replies = await read_replies(reader, 6)
        stored = spool.envelopes()
        await finish(server, writer)
        return replies, stored

    replies, stored = asyncio.run(scenario())
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    (envelope,) = stored
    assert (envelope.ret, envelope.envid) == ("HDRS", "QQ+2B314159")
    assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
        ("b@example.net", "SUCCESS,FAILURE", "rfc822;x@y.test"), ("c@example.net", "", "")]


def test_a_helo_name_cannot_forge_the_received_trace():
    """Postfix's neutering: "(…)", spaces and ";" become "?", so the trace stays one clause
    naming the real client, and the log says the same."""
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, log = await serve(spool)
        writer.write(b"EHLO trusted.example (localhost [10.0.0.1]) by x;\r\n"
                     + TRANSACTION[len(b"EHLO c.test\r\n"):] + b"Subject: x\r\n\r\nbody\r\n.\r\n"
                     b"MAIL FROM:<a@example.org>\r\nRCPT TO:<nosuchuser@mx.test>\r\n")
        replies = await read_replies(reader, 7)
        (envelope,) = spool.envelopes()
        content = spool.content(envelope.queue_id)
        await finish(server, writer)
        return replies, content, log.getvalue()

    replies, content, log = asyncio.run(scenario())
    assert replies[4].startswith("250 2.0.0 Ok: queued as ")
    assert content.startswith(b"Received: from trusted.example??localhost?[10.0.0.1]??by?x? "
                              b"(unknown [127.0.0.1])\r\n\tby mx.test (Tern) with ESMTP id ")
    assert "helo=<trusted.example??localhost?[10.0.0.1]??by?x?>" in log  # the RCPT reject


def test_idle_client_gets_421_after_smtpd_timeout():
    async def scenario():
        server, reader, writer, log = await serve(MemorySpool(), smtpd_timeout=0.2)
        writer.write(b"EHLO c.test\r\n")
        await read_replies(reader, 1)
        line = await asyncio.wait_for(reader.readline(), 5)
        closed = await asyncio.wait_for(reader.read(), 5)
        await finish(server, writer)
        return line, closed, log.getvalue()

    line, closed, log = asyncio.run(scenario())
    assert line == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert closed == b""
    assert "timeout after EHLO from unknown[127.0.0.1]" in log
    assert "disconnect from unknown[127.0.0.1] ehlo=1 commands=1" in log
    assert "lost connection" not in log


def test_client_that_never_reads_cannot_grow_the_reply_buffer():
    """HELP answers 70 bytes to 6: without write backpressure the server would buffer ~20 MB."""
    commands = b"HELP\r\n" * 300_000

    async def scenario():
        server, reader, writer, _ = await serve(MemorySpool())
        session = next(iter(server_sessions))
        writer.write(commands)
        await asyncio.sleep(1.5)  # the client never reads; give the server time to run
        buffered = session.transport.get_write_buffer_size()
        paused = "write" in session._paused_by
        writer.transport.abort()
        await finish(server, writer)
        return buffered, paused

    server_sessions.clear()
    buffered, paused = asyncio.run(scenario())
    assert paused
    assert buffered < 8 * 1024 * 1024


def test_concurrent_sessions_share_spool_commits(tmp_path):
    """Group commit: messages finished together are written and synced in one transaction."""
    sessions = 20

    async def scenario():
        spool = LmdbSpool(tmp_path / "spool", commit_window=0.005)
        server, reader, writer, _ = await serve(spool)
        port = server.sockets[0].getsockname()[1]
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(sessions)]
        for client_reader, _ in clients:
            await client_reader.readline()
        for _, client_writer in clients:
            client_writer.write(TRANSACTION + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        replies = [(await read_replies(r, 5))[-1] for r, _ in clients]
        for _, client_writer in clients:
            client_writer.close()
        await finish(server, writer)
        figures = spool.commits, spool.messages_committed
        spool.close()
        return replies, figures

    replies, (commits, committed) = asyncio.run(scenario())
    assert all(reply.startswith("250 2.0.0 Ok: queued as") for reply in replies)
    assert committed == sessions
    assert commits < sessions


def test_connection_over_smtpd_connection_limit_gets_421_and_the_others_go_on():
    """A cap of 3: the 4th client is told 421 and closed; the first three still queue mail."""

    async def scenario():
        server_sessions.clear()
        spool = MemorySpool()
        server, reader, writer, log = await serve(spool, smtpd_connection_limit=3)
        port = server.sockets[0].getsockname()[1]
        clients = [(reader, writer)]
        for _ in range(2):
            client = await asyncio.open_connection("127.0.0.1", port)
            await client[0].readline()  # greeting
            clients.append(client)
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
        refusal = await asyncio.wait_for(extra_reader.read(), 5)  # the reply, then EOF
        extra_writer.close()
        served = len(server_sessions)
        for _, client_writer in clients:
            client_writer.write(TRANSACTION + b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies = [await read_replies(client_reader, 6) for client_reader, _ in clients]
        for _, client_writer in clients[1:]:
            client_writer.close()
        await finish(server, writer)
        return refusal, served, replies, len(spool.envelopes()), log.getvalue()

    refusal, served, replies, stored, log = asyncio.run(scenario())
    assert refusal == b"421 4.7.0 mx.test Error: too many connections\r\n"
    assert served == 3
    for session_replies in replies:
        assert session_replies[-2].startswith("250 2.0.0 Ok: queued as ")
        assert session_replies[-1].startswith("221 ")
    assert stored == 3
    assert "warning: connection limit 3 reached: refusing unknown[127.0.0.1]" in log
    assert log.count(": connect from unknown[127.0.0.1]") == 3  # the refused one is no session
    assert log.count(": disconnect from unknown[127.0.0.1]") == 3


def test_message_over_hopcount_limit_gets_554_too_many_hops_and_is_not_queued():
    async def scenario():
        spool = MemorySpool()
        server, reader, writer, log = await serve(spool, hopcount_limit=5)
        hop = b"Received: from a.test by b.test; now\r\n"
        looped = hop * 4  # with this hop's own: 5
        writer.write(TRANSACTION + looped + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                     + hop * 3 + b"Subject: y\r\n\r\nbody\r\n.\r\n")
        replies = await read_replies(reader, 9)
        stored = spool.envelopes()
        await finish(server, writer)
        return replies, stored, log.getvalue()

    replies, stored, log = asyncio.run(scenario())
    assert replies[4] == "554 5.4.0 Error: too many hops"
    assert replies[8].startswith("250 2.0.0 Ok: queued as ")  # one hop fewer: accepted
    assert len(stored) == 1
    assert "reject: END-OF-MESSAGE from unknown[127.0.0.1]: 554 5.4.0 Error: too many hops" in log


def test_addresses_starting_with_a_dash_get_501_over_smtplib():
    """Postfix's allow_min_user = no: "-C/tmp/evil.cf@…" could read as a command option
    further on (pipe, sendmail), so smtpd refuses it as bad address syntax."""
    async def scenario():
        spool = MemorySpool()
        server, _, writer, _ = await serve(spool)
        writer.close()
        port = server.sockets[0].getsockname()[1]

        def client():
            import smtplib
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                answers = [smtp.mail("-C/tmp/evil.cf@example.org"), smtp.mail("a@example.org"),
                           smtp.rcpt("-oQ/tmp@example.net"), smtp.rcpt("b-@example.net")]
                return answers

        answers = await asyncio.get_running_loop().run_in_executor(None, client)
        server.close()
        await server.wait_closed()
        return answers

    assert asyncio.run(scenario()) == [
        (501, b"5.1.7 Bad sender address syntax"), (250, b"2.1.0 Ok"),
        (501, b"5.1.3 Bad recipient address syntax"), (250, b"2.1.5 Ok")]
