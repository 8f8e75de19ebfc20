"""Abuse defences over a socket, each with its reply and log line: error limits (tarpit and
disconnect), NUL bytes, over-long command lines and 100 KB without a line end, trickling
clients (per-request deadline), and the per-client anvil limits."""

import asyncio
import socket
import time

import pytest
from abuse import Server, close, nets, read_line, replies, settle, until_closed

from engine.smtp import server as core

CLIENT = "unknown[127.0.0.1]"


def run(scenario):
    return asyncio.run(scenario())


# -- smtpd_hard_error_limit / smtpd_soft_error_limit -------------------------------------------


def test_hard_error_limit_default_20_is_421_and_disconnect():
    async def scenario():
        async with Server(smtpd_error_sleep_time=0) as srv:
            reader, writer = await srv.connect()
            writer.write(b"XYZZY\r\n" * 25)
            rest = (await until_closed(reader)).decode()
            await close(writer)
            await settle(srv)
            return rest, srv.log()

    rest, log = run(scenario)
    lines = rest.splitlines()
    assert lines[:20] == ["502 5.5.2 Error: command not recognized"] * 20
    assert lines[20:] == ["421 4.7.0 mx.test Error: too many errors"]
    assert f"too many errors after UNKNOWN from {CLIENT}" in log
    assert "lost connection" not in log
    assert f"disconnect from {CLIENT} unknown=20 commands=20" in log


def test_errors_of_every_kind_count_and_a_delivered_message_resets_them():
    async def scenario():
        async with Server(smtpd_hard_error_limit=4, smtpd_error_sleep_time=0,
                          smtpd_forbid_unauth_pipelining=False) as srv:
            reader, writer = await srv.connect()
            writer.write(b"EHLO c.test\r\nRCPT TO:<x@y.test>\r\nMAIL FROM:<bad\r\n"
                         b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                         b"x\r\n.\r\n"  # delivered: the count starts again
                         b"XYZZY\r\nXYZZY\r\nXYZZY\r\nRCPT TO:<x@y.test>\r\nNOOP\r\n")
            rest = (await until_closed(reader)).decode()
            await close(writer)
            return rest

    codes = [line[:3] for line in run(scenario).splitlines() if line[3:4] == " "]
    assert codes == ["250", "503", "501", "250", "250", "354", "250",
                     "502", "502", "502", "503", "421"]


def test_over_the_soft_limit_every_reply_is_delayed():
    sleep = 0.3

    async def scenario():
        async with Server(smtpd_soft_error_limit=1, smtpd_error_sleep_time=sleep,
                          smtpd_forbid_unauth_pipelining=False) as srv:
            reader, writer = await srv.connect()
            writer.write(b"XYZZY\r\nXYZZY\r\nXYZZY\r\nNOOP\r\n")
            await read_line(reader)  # error 1: not over the limit yet, at once
            start = time.monotonic()
            second = await read_line(reader)
            after_second = time.monotonic() - start
            rest = [await read_line(reader) for _ in range(2)]
            after_all = time.monotonic() - start
            await close(writer)
            return second, rest, after_second, after_all

    second, rest, after_second, after_all = run(scenario)
    assert second.startswith(b"502 ") and rest[-1].startswith(b"250 ")
    # three replies, each held smtpd_error_sleep_time (a timer never fires early by more than
    # the loop's clock resolution)
    assert after_second >= sleep * 0.9
    assert after_all >= 3 * sleep * 0.9


def test_core_tarpit_hands_out_one_reply_at_a_time(impl):
    session = core.ServerSession(core.Settings(hostname="mx.test", banner="mx.test",
                                               soft_error_limit=1), impl("reader").Reader)
    session.data_to_send()
    session.receive_data(b"XYZZY\r\nXYZZY\r\nXYZZY\r\n")
    for errors in (1, 2, 3):  # one reply per call once the limit is reached
        assert session.next_event() is None
        assert session.data_to_send().count(b"\r\n") == 1
        assert session.error_count == errors


# -- NUL bytes, long lines, no line end -------------------------------------------------------


def test_nul_in_a_command_is_500_and_logged_and_nul_in_content_is_kept():
    async def scenario():
        async with Server() as srv:
            reader, writer = await srv.connect()
            writer.write(b"EHLO c.test\r\n")
            await replies(reader, 1)
            writer.write(b"MAIL FROM:<a@example.org>\0<b@evil.test>\r\n")
            refused = await replies(reader, 1)
            writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            await replies(reader, 3)
            writer.write(b"Subject: x\r\n\r\nbin\0ary\r\n.\r\n")
            queued = await replies(reader, 1)
            await close(writer)
            await settle(srv)
            (envelope,) = srv.spool.envelopes()
            return refused, queued, srv.spool.content(envelope.queue_id), srv.log()

    refused, queued, content, log = run(scenario)
    assert refused == ["500 5.5.2 Error: bad syntax"]
    assert (f"warning: NUL character in command after EHLO from {CLIENT}: "
            "MAIL FROM:<a@example.org>\\000<b@evil.test>") in log
    assert queued[0].startswith("250 2.0.0 Ok: queued as ")
    assert content.endswith(b"\r\n\r\nbin\0ary\r\n")  # binary-safe, as Postfix's queue file


def test_command_line_over_the_limit_is_500_and_the_session_goes_on():
    async def scenario():
        async with Server(line_length_limit=512) as srv:
            reader, writer = await srv.connect()
            writer.write(b"NOOP " + b"x" * 600 + b"\r\n")
            first = await replies(reader, 1)
            writer.write(b"NOOP\r\n")
            second = await replies(reader, 1)
            await close(writer)
            return first + second, srv.log()

    got, log = run(scenario)
    assert got == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]
    assert f"warning: command line too long after CONNECT from {CLIENT}" in log


@pytest.mark.parametrize("in_data", [False, True], ids=["command", "data"])
def test_100kb_without_a_line_end_is_never_buffered_whole(in_data):
    """The buffer holds at most about a line limit of it in command mode; in DATA the bytes
    are passed on as they come (the builder has them, the reader does not)."""

    async def scenario():
        async with Server(message_size_limit=0) as srv:
            reader, writer = await srv.connect()
            await_ = [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n",
                      b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n"] if in_data else []
            for command in await_:
                writer.write(command)
                await replies(reader, 1)
            (session,) = srv.sessions
            held = 0
            for _ in range(25):  # 25 x 4 KB, no line end
                writer.write(b"y" * 4096)
                await writer.drain()
                await asyncio.sleep(0.005)
                held = max(held, session.session.pending_input)
            writer.write(b"\r\n.\r\n" if in_data else b"\r\nNOOP\r\n")
            got = await replies(reader, 1 if in_data else 2)
            await close(writer)
            return held, got

    held, got = run(scenario)
    assert held <= 2048 + 4096
    if in_data:
        assert got[0].startswith("250 2.0.0 Ok: queued as ")
    else:
        assert got == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


# -- smtpd_timeout with a per-request deadline: a trickling client ---------------------------


@pytest.mark.parametrize("phase", ["command", "data"])
def test_trickling_client_gets_421_at_its_request_deadline(phase):
    async def scenario():
        async with Server(smtpd_timeout=1, smtpd_min_data_rate=500,
                          smtpd_forbid_unauth_pipelining=False) as srv:
            reader, writer = await srv.connect()
            if phase == "data":
                writer.write(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n"
                             b"RCPT TO:<b@example.net>\r\nDATA\r\n")
                await replies(reader, 4)
            got = b""
            for byte in b"NOOP and so on, one byte at a time, forever"[:40]:  # bounded
                writer.write(bytes([byte]))
                try:
                    got = await asyncio.wait_for(reader.readline(), 0.25)
                except TimeoutError:
                    continue
                break
            await close(writer)
            await settle(srv)
            return got, srv.log()

    got, log = run(scenario)
    assert got == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    after = "CONNECT" if phase == "command" else "DATA"
    assert f"timeout after {after} from {CLIENT}" in log


def test_without_the_per_request_deadline_a_trickle_is_only_an_idle_timeout():
    """The contrast: smtpd_per_request_deadline = no lets bytes every 0.25 s outlive a 1 s
    smtpd_timeout (Postfix's default behaviour), which is what the deadline is for."""

    async def scenario():
        async with Server(smtpd_timeout=1, smtpd_per_request_deadline=False) as srv:
            reader, writer = await srv.connect()
            for byte in b"NOOP ......":  # 11 bytes, ~2.75 s
                writer.write(bytes([byte]))
                await asyncio.sleep(0.25)
            writer.write(b"\r\n")
            got = await replies(reader, 1)
            await close(writer)
            return got

    assert run(scenario) == ["250 2.0.0 Ok"]


# -- anvil: per-client limits -------------------------------------------------------------------


def test_connection_count_limit_per_client():
    async def scenario():
        async with Server(smtpd_client_connection_count_limit=2,
                          smtpd_client_event_limit_exceptions=()) as srv:
            first = [await srv.connect() for _ in range(2)]
            reader, writer = await srv.connect(greeting=False)
            refused = await until_closed(reader)
            await close(writer)
            other = await srv.connect("127.0.0.2")  # another client is not affected
            await close(first[0][1])
            await settle_count(srv, 2)
            again = await srv.connect()  # one slot free again
            for _, w in [*first[1:], other, again]:
                await close(w)
            await settle(srv)
            return refused, srv.log()

    refused, log = run(scenario)
    assert refused == b"421 4.7.0 mx.test Error: too many connections from 127.0.0.1\r\n"
    assert (f"warning: Connection concurrency limit exceeded: 3 from {CLIENT} "
            "for service smtp") in log
    assert log.count(f"disconnect from {CLIENT}") == 4


async def settle_count(srv, count):
    for _ in range(100):
        if len(srv.sessions) <= count:
            return
        await asyncio.sleep(0.01)


def test_connection_rate_limit_per_client():
    async def scenario():
        async with Server(smtpd_client_connection_rate_limit=2,
                          smtpd_client_event_limit_exceptions=nets("127.0.0.3/32")) as srv:
            for _ in range(2):
                _, writer = await srv.connect()
                await close(writer)
            reader, writer = await srv.connect(greeting=False)
            refused = await until_closed(reader)
            await close(writer)
            for _ in range(3):  # an exception is never counted
                _, writer = await srv.connect("127.0.0.3")
                await close(writer)
            await settle(srv)
            return refused, srv.log()

    refused, log = run(scenario)
    assert refused == b"421 4.7.0 mx.test Error: too many connections from 127.0.0.1\r\n"
    assert f"warning: Connection rate limit exceeded: 3 from {CLIENT} for service smtp" in log
    assert "127.0.0.3] for service" not in log


def test_clients_in_mynetworks_are_exempt_by_default():
    async def scenario():
        async with Server(smtpd_client_connection_count_limit=1) as srv:
            clients = [await srv.connect() for _ in range(3)]
            for _, writer in clients:
                await close(writer)
            await settle(srv)
            return srv.log()

    assert "limit exceeded" not in run(scenario)


def test_message_and_recipient_rate_limits_per_client():
    async def scenario():
        async with Server(smtpd_client_message_rate_limit=1, mynetworks=(),
                          smtpd_client_recipient_rate_limit=2, relay_domains=("example.net",),
                          smtpd_client_event_limit_exceptions=()) as srv:
            reader, writer = await srv.connect()
            writer.write(b"EHLO c.test\r\n")
            await replies(reader, 1)
            got = []
            for command in [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>",
                            b"RCPT TO:<c@example.net>", b"RCPT TO:<d@example.net>", b"RSET",
                            b"MAIL FROM:<a@example.org>"]:
                writer.write(command + b"\r\n")
                got += await replies(reader, 1)
            await close(writer)
            await settle(srv)
            return got, srv.log()

    got, log = run(scenario)
    assert got == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                   "450 4.7.1 Error: too many recipients from 127.0.0.1", "250 2.0.0 Ok",
                   "450 4.7.1 Error: too much mail from 127.0.0.1"]
    assert (f"warning: Recipient address rate limit exceeded: 3 from {CLIENT} "
            "for service smtp") in log
    assert (f"warning: Message delivery request rate limit exceeded: 2 from {CLIENT} "
            "for service smtp") in log


def test_tern_serve_applies_the_connection_rate_limit_over_its_time_unit(tern):
    """The real server: the limits come from the TOML file and serve's Anvil counts over
    anvil_rate_time_unit (2s). The 4th connection of the window is refused, whatever the
    fixture's own start-up probe counted for; once the window is over, a client is welcome."""
    server = tern(worker_count=1, smtpd_client_connection_rate_limit=3,
                  smtpd_client_event_limit_exceptions=[], anvil_rate_time_unit="2s")
    greetings = []
    for _ in range(5):
        with socket.create_connection(server.address, timeout=10) as client:
            greetings.append(client.makefile("rb").readline())
    refusal = b"421 4.7.0 mx.tern.test Error: too many connections from 127.0.0.1\r\n"
    assert refusal in greetings and greetings[0].startswith(b"220 ")
    server.wait_log("warning: Connection rate limit exceeded: 4 from unknown[127.0.0.1] "
                    "for service smtp")
    time.sleep(2.2)  # the next window (anvil's default unit, 60s, would still refuse)
    with socket.create_connection(server.address, timeout=10) as client:
        assert client.makefile("rb").readline().startswith(b"220 ")
