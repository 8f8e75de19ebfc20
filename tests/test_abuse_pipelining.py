"""Unauthorized pipelining (smtpd_forbid_unauth_pipelining, on by default as in Postfix 3.9):
a client that speaks before the greeting, or sends more after a command that must end a group
(HELO, EHLO, DATA, NOOP, VRFY, or anything before EHLO announced PIPELINING) gets
"554 5.5.0 Error: SMTP protocol synchronization" and is disconnected; legitimate PIPELINING
after EHLO and ordinary clients (smtplib, smtp-source, swaks) are unaffected."""

import asyncio
import shutil
import smtplib
import socket

import pytest
import uvloop
from abuse import Server, close, replies, settle, until_closed

SYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"


async def ehlo(reader, writer):
    writer.write(b"EHLO c.test\r\n")
    await replies(reader, 1)


@pytest.mark.parametrize("first, batch, after, detail", [
    (b"", b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\n", "HELO",
     "MAIL FROM:<a@example.org>\\r\\n"),
    (b"", b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n", "EHLO",
     "MAIL FROM:<a@example.org>\\r\\n"),
    (b"HELO c.test\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n", "MAIL",
     "RCPT TO:<b@example.net>\\r\\n"),  # no EHLO: no PIPELINING was announced
    (b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
     b"Subject: early\r\n", "DATA", "Subject: early\\r\\n"),  # content before the 354
    (b"EHLO c.test\r\n", b"NOOP\r\nNOOP\r\n", "NOOP", "NOOP\\r\\n"),
])  # fmt: skip
def test_improper_pipelining_is_554_and_disconnect(first, batch, after, detail):
    async def scenario():
        async with Server() as srv:
            reader, writer = await srv.connect()
            if first:
                writer.write(first)
                await replies(reader, 1)
            writer.write(batch)
            rest = await until_closed(reader)
            await close(writer)
            await settle(srv)
            return rest, srv.log(), srv.spool.envelopes()

    rest, log, stored = asyncio.run(scenario())
    assert rest.endswith(SYNC)
    assert rest.count(b"\r\n") <= 3  # nothing of the batch after the offending command ran
    assert (f"improper command pipelining after {after} from unknown[127.0.0.1]: {detail}"
            in log)
    assert "lost connection" not in log
    assert stored == []


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_client_speaking_before_the_greeting_gets_554_instead_of_220(runner):
    """The client writes before the server could greet it (here: before the loop even accepts
    the connection), as spam bots do: Postfix's peekfd check at the greeting."""

    async def scenario():
        async with Server() as srv:
            raw = socket.create_connection(("127.0.0.1", srv.port))
            raw.sendall(b"EHLO bot.test\r\nMAIL FROM:<spam@bot.test>\r\n")
            raw.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=raw)
            rest = await until_closed(reader)
            await close(writer)
            await settle(srv)
            return rest, srv.log()

    rest, log = runner(scenario())
    assert rest == SYNC  # no 220
    assert ("improper command pipelining after CONNECT from unknown[127.0.0.1]: "
            "EHLO bot.test\\r\\nMAIL FROM:<spam@bot.test>\\r\\n") in log
    assert "disconnect from unknown[127.0.0.1]" in log


def test_the_setting_off_lets_such_clients_through():
    async def scenario():
        async with Server(smtpd_forbid_unauth_pipelining=False) as srv:
            reader, writer = await srv.connect()
            writer.write(b"EHLO c.test\r\nNOOP\r\nQUIT\r\n")
            got = await replies(reader, 3)
            await close(writer)
            return got

    assert [line[:3] for line in asyncio.run(scenario())] == ["250", "250", "221"]


def test_legitimate_pipelining_after_ehlo_is_answered_in_order():
    async def scenario():
        async with Server() as srv:
            reader, writer = await srv.connect()
            await ehlo(reader, writer)
            writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                         b"RCPT TO:<c@example.net>\r\nDATA\r\n")
            first = await replies(reader, 4)
            writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            queued = await replies(reader, 1)
            writer.write(b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                         b"QUIT\r\n")
            last = await replies(reader, 4)
            await close(writer)
            return first + queued + last, len(srv.spool.envelopes()), srv.log()

    got, stored, log = asyncio.run(scenario())
    assert [line[:3] for line in got] == ["250"] * 3 + ["354", "250", "250", "250", "250", "221"]
    assert stored == 1
    assert "improper" not in log


def test_smtplib_session_is_unaffected():
    async def scenario():
        async with Server() as srv:
            def send():
                with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
                    client.sendmail("a@example.org", ["b@example.net", "c@example.net"],
                                    b"Subject: x\r\n\r\nbody\r\n")
                    client.noop()
            await asyncio.to_thread(send)
            await settle(srv)
            return len(srv.spool.envelopes()), srv.log()

    stored, log = asyncio.run(scenario())
    assert stored == 1 and "improper" not in log


@pytest.mark.skipif(shutil.which("smtp-source") is None, reason="smtp-source not installed")
def test_smtp_source_pipelining_is_unaffected():
    """Postfix's smtp-source pipelines MAIL/RCPT/DATA after EHLO: 3 sessions, 2 messages each."""

    async def scenario():
        async with Server() as srv:
            process = await asyncio.create_subprocess_exec(
                "smtp-source", "-s", "3", "-m", "6", "-d", "-r", "2", "-f", "a@example.org",
                "-t", "b@example.net", "-M", "source.test", f"127.0.0.1:{srv.port}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await asyncio.wait_for(process.communicate(), 30)
            await settle(srv)
            return process.returncode, output, len(srv.spool.envelopes()), srv.log()

    returncode, output, stored, log = asyncio.run(scenario())
    assert returncode == 0, output
    assert stored == 6
    assert "improper" not in log


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_pipelining_is_unaffected():
    async def scenario():
        async with Server() as srv:
            process = await asyncio.create_subprocess_exec(
                "swaks", "--server", f"127.0.0.1:{srv.port}", "--pipeline", "--from",
                "a@example.org", "--to", "b@example.net", "--helo", "swaks.test",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await asyncio.wait_for(process.communicate(), 30)
            await settle(srv)
            return process.returncode, output, len(srv.spool.envelopes()), srv.log()

    returncode, output, stored, log = asyncio.run(scenario())
    assert returncode == 0, output
    assert stored == 1
    assert "improper" not in log

