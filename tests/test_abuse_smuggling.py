"""SMTP smuggling: a bare LF or bare CR never ends DATA. Each near-miss end-of-data sequence is
followed by a smuggled transaction; it must stay message content (normalize, the default), or
get the message refused (smtpd_forbid_bare_newline = reject). Fed to the sans-I/O core with
both reader twins, and over a socket to the adapter."""

import asyncio

import pytest
from abuse import Server, close, nets, replies, settle, until_closed

from engine.smtp import server

SMUGGLED = b"MAIL FROM:<spoof@bank.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nevil\r\n"
NEAR_MISSES = {  # the sequences of the smuggling papers; none may end DATA
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-dot-cr": b"\r\n.\r",
}


def drive(reader_class, data, **settings):
    """Feed ``data`` to a ServerSession that accepts every request; (events, reply lines)."""
    session = server.ServerSession(server.Settings(hostname="mx.test", banner="mx.test ESMTP",
                                                   **settings), reader_class)
    session.data_to_send()
    session.receive_data(data)
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
        if session.awaiting_answer:
            session.accept()
    lines = session.data_to_send().decode().split("\r\n")
    return events, [line for line in lines if line[3:4] == " "], session


def transaction(content):
    return (b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            + content)


@pytest.mark.parametrize("near_miss", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_miss_does_not_end_data_and_the_smuggled_transaction_is_content(impl, near_miss):
    data = transaction(b"Subject: x\r\n\r\nhello" + near_miss + SMUGGLED + b".\r\nQUIT\r\n")
    events, codes, _ = drive(impl("reader").Reader, data)
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("MailFrom") == 1 and kinds.count("RcptTo") == 1  # nothing smuggled
    assert kinds.count("MessageEnd") == 1
    content = b"".join(e.data for e in events if isinstance(e, server.MessageChunk))
    assert b"MAIL FROM:<spoof@bank.test>\r\n" in content
    assert b"\r\n.\r\n" not in content and b"\n.\n" not in content  # no end left to find later
    assert b"\n" not in content.replace(b"\r\n", b"")  # normalize: every line ends in CRLF
    assert [c[:3] for c in codes] == ["250", "250", "250", "354", "250", "221"]


@pytest.mark.parametrize("near_miss", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_reject_refuses_a_message_with_a_bare_lf(impl, near_miss):
    data = transaction(b"hello" + near_miss + SMUGGLED + b".\r\nNOOP\r\n")
    events, codes, _ = drive(impl("reader").Reader, data, reject_bare_newline=True)
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("MailFrom") == 1
    if b"\n" in near_miss.replace(b"\r\n", b""):  # a bare LF: the message is refused
        assert "MessageEnd" not in kinds and "Reset" in kinds
        assert codes[-2:] == ["550 5.5.2 mx.test Error: bare <LF> received", "250 2.0.0 Ok"]
        (violation,) = [e for e in events if isinstance(e, server.Violation)]
        assert (violation.what, violation.after, violation.closing) == (
            "bare <LF> received", "DATA", False)
    else:  # a bare CR is content, as in Postfix
        assert "MessageEnd" in kinds and codes[-2][:3] == "250"


def test_reject_code_521_disconnects(impl):
    data = transaction(b"hello\n.\n" + SMUGGLED + b".\r\nNOOP\r\n")
    events, codes, session = drive(impl("reader").Reader, data, reject_bare_newline=True,
                                   bare_newline_reject_code=521)
    assert codes[-1] == "521 5.5.2 mx.test Error: bare <LF> received"
    assert session.closed
    assert isinstance(events[-1], server.Closed)


def test_reject_refuses_a_command_ending_in_a_bare_lf(impl):
    events, codes, _ = drive(impl("reader").Reader, b"EHLO c.test\nNOOP\r\n",
                             reject_bare_newline=True)
    assert codes == ["550 5.5.2 mx.test Error: bare <LF> received", "250 2.0.0 Ok"]
    assert not any(isinstance(e, server.Helo) for e in events)  # EHLO was not executed


def test_normalize_accepts_a_command_ending_in_a_bare_lf(impl):
    events, codes, _ = drive(impl("reader").Reader, b"HELO c.test\nNOOP\n")
    assert [c[:3] for c in codes] == ["250", "250"]


# -- over a socket, through the adapter ----------------------------------------------------


def test_default_normalize_queues_one_message_with_crlf_lines():
    async def scenario():
        async with Server(smtpd_forbid_unauth_pipelining=False) as srv:
            reader, writer = await srv.connect()
            writer.write(transaction(b"Subject: x\r\n\r\nhello\n.\n" + SMUGGLED
                                     + b".\r\nQUIT\r\n"))
            got = await replies(reader, 6)
            await close(writer)
            await settle(srv)
            return got, srv.spool

    got, spool = asyncio.run(scenario())
    assert got[4].startswith("250 2.0.0 Ok: queued as ")
    (envelope,) = spool.envelopes()  # one message: the smuggled one was not a transaction
    assert envelope.sender == "a@example.org"
    content = spool.content(envelope.queue_id)
    assert b"hello\r\n\r\nMAIL FROM:<spoof@bank.test>\r\n" in content


def test_reject_over_a_socket_replies_and_logs_and_mynetworks_is_excluded():
    async def scenario():
        # 127.0.0.1 is in mynetworks (the exclusions' default), 127.0.0.2 is not
        async with Server(smtpd_forbid_bare_newline="reject", mynetworks=nets("127.0.0.1/32"),
                          smtpd_forbid_unauth_pipelining=False) as srv:
            outcome = {}
            for source in ("127.0.0.2", "127.0.0.1"):
                reader, writer = await srv.connect(source)
                writer.write(transaction(b"hello\n.\n" + SMUGGLED + b".\r\nQUIT\r\n"))
                outcome[source] = await replies(reader, 6)
                await close(writer)
            await settle(srv)
            return outcome, len(srv.spool.envelopes()), srv.log()

    outcome, stored, log = asyncio.run(scenario())
    assert outcome["127.0.0.2"][4] == "550 5.5.2 mx.test Error: bare <LF> received"
    assert outcome["127.0.0.1"][4].startswith("250 2.0.0 Ok: queued as ")  # excluded client
    assert stored == 1
    assert "bare <LF> received after DATA from unknown[127.0.0.2]" in log
    assert "bare <LF> received after DATA from unknown[127.0.0.1]" not in log


def test_reject_521_closes_the_connection():
    async def scenario():
        async with Server(smtpd_forbid_bare_newline="reject", mynetworks=(),
                          smtpd_forbid_bare_newline_reject_code=521,
                          smtpd_forbid_unauth_pipelining=False) as srv:
            reader, writer = await srv.connect()
            writer.write(b"EHLO c.test\n")
            rest = await until_closed(reader)
            await close(writer)
            await settle(srv)
            return rest, srv.log()

    rest, log = asyncio.run(scenario())
    assert rest == b"521 5.5.2 mx.test Error: bare <LF> received\r\n"
    assert "bare <LF> received after CONNECT from unknown[127.0.0.1]" in log
    assert "lost connection" not in log
