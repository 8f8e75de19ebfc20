"""RFC 3030 CHUNKING / BDAT fed as bytes to the sans-I/O server core (both reader twins), with
Postfix smtpd's replies: chunks by byte count, BDAT LAST, errors that still read the chunk so the
stream stays in step, the size limit across chunks, and BDAT pipelined with other commands."""

import pytest
from test_smtp_server import Driver, codes

from engine.smtp import server
from engine.smtp.replies import Reply

TXN = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
OK_CHUNK = "250 2.0.0 Ok: {} bytes"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
SYNTAX = "521 5.5.4 Syntax: BDAT count [LAST]"


@pytest.fixture
def smtp(impl):
    reader_class = impl("reader").Reader
    return lambda **kwargs: Driver(reader_class, **kwargs)


def opened(smtp, **settings):
    """A session with MAIL and RCPT accepted; its replies so far are drained."""
    d = smtp(**settings)
    assert codes(d.send(TXN)) == ["250", "250", "250"]
    return d


def kinds(driver, *types):
    return [e for e in driver.events if isinstance(e, types)]


def test_chunks_are_answered_with_their_size_and_last_ends_the_message(smtp):
    d = opened(smtp)
    assert d.send(b"BDAT 5\r\nhello") == [OK_CHUNK.format(5)]
    assert d.send(b"BDAT 8 LAST\r\n world\r\n") == ["250 2.0.0 Ok"]
    assert d.message() == b"hello world\r\n"
    assert kinds(d, server.Data) == [server.Data(bdat=True)]  # one request: the first chunk
    assert kinds(d, server.MessageEnd) == [server.MessageEnd(chunked_size=13)]
    assert d.session.state is server.State.IDLE
    assert d.session.command_counts["bdat"] == 2


def test_chunk_content_is_kept_exactly_as_sent(smtp):
    """No dot-unstuffing and no line scanning: dots, bare LF / CR, an end-of-data line and
    command lines inside a chunk are content."""
    content = (b"Subject: x\r\n\r\n..two dots\r\n.\r\nMAIL FROM:<evil@b.test>\r\n"
               b"bare\nlf\rcr\n.\n\r\n.")
    d = opened(smtp)
    assert d.send(b"BDAT %d LAST\r\n" % len(content) + content) == ["250 2.0.0 Ok"]
    assert d.message() == content
    assert len(kinds(d, server.MailFrom)) == 1


@pytest.mark.parametrize("pieces", [1, 3, 1000], ids=["whole", "thirds", "byte-at-a-time"])
def test_pipelined_transaction_in_any_pieces_is_answered_in_order(smtp, pieces):
    stream = (b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
              b"BDAT 6\r\nab\r\ncdBDAT 3\r\nefgBDAT 0 LAST\r\n"
              b"MAIL FROM:<c@b.test>\r\nRCPT TO:<z@y.test>\r\nBDAT 2 LAST\r\nhiQUIT\r\n")
    d = smtp()
    size = max(1, len(stream) // pieces)
    lines = []
    for start in range(0, len(stream), size):
        lines += d.send(stream[start : start + size])
    assert [line for line in lines if line[3] == " "] == [
        "250 CHUNKING", "250 2.1.0 Ok", "250 2.1.5 Ok", OK_CHUNK.format(6),
        OK_CHUNK.format(3), "250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok",
        "221 2.0.0 Bye"]
    assert d.message() == b"ab\r\ncdefg" + b"hi"
    assert kinds(d, server.MessageEnd) == [server.MessageEnd(chunked_size=9),
                                           server.MessageEnd(chunked_size=2)]
    assert d.events[-1] == server.Closed(during="QUIT", quit=True)


def test_bdat_0_last_alone_is_an_empty_message(smtp):
    d = opened(smtp)
    assert d.send(b"BDAT 0 LAST\r\n") == ["250 2.0.0 Ok"]
    assert kinds(d, server.Data, server.MessageChunk, server.MessageEnd) == [
        server.Data(bdat=True), server.MessageEnd(chunked_size=0)]


def test_last_keyword_is_case_insensitive(smtp):
    d = opened(smtp)
    assert d.send(b"bdat 2 last\r\nok") == ["250 2.0.0 Ok"]


@pytest.mark.parametrize("command", [
    b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 5 FIRST", b"BDAT 5 LAST more", b"BDAT 1e3",
    b"BDAT \xd9\xa3", b"BDAT 99999999999999999999",
])
def test_malformed_bdat_is_521_and_hangs_up(smtp, command):
    """The byte count is unknown, so the stream cannot be kept in step: Postfix hangs up
    rather than read message content as commands."""
    d = opened(smtp)
    assert d.send(command + b"\r\nMAIL FROM:<evil@b.test>\r\n") == [SYNTAX]
    assert d.session.closed
    assert d.events[-1] == server.Closed(during="BDAT", quit=False, hangup=True)
    assert len(kinds(d, server.MailFrom)) == 1


def test_bdat_before_mail_is_503_and_its_chunk_is_read_not_run(smtp):
    d = smtp()
    assert d.send(b"BDAT 12\r\nRSET\r\nNOOP\r\n") == [NEED_RCPT]
    # Postfix: after a failed BDAT that was not LAST, the rest of the "transaction" is refused
    assert d.send(b"MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1 Error: MAIL after BDAT"]
    assert d.send(b"BDAT 3 LAST\r\nxyz") == ["551 5.0.0 Discarded 3 bytes after earlier error"]
    assert d.send(b"MAIL FROM:<a@b.test>\r\n") == ["250 2.1.0 Ok"]
    assert kinds(d, server.Data, server.MessageChunk, server.MessageEnd) == []


def test_bdat_last_before_mail_is_503_and_the_session_is_clean(smtp):
    d = smtp()
    assert d.send(b"BDAT 6 LAST\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n") == [NEED_RCPT,
                                                                        "250 2.1.0 Ok"]


def test_bdat_without_recipients_is_554_as_data(smtp):
    d = smtp()
    lines = d.send(b"MAIL FROM:<a@b.test>\r\nBDAT 3 LAST\r\nabcNOOP\r\n")
    assert lines == ["250 2.1.0 Ok", "554 5.5.1 Error: no valid recipients", "250 2.0.0 Ok"]
    assert kinds(d, server.Reset) == [server.Reset()]  # the MAIL transaction is over


def test_after_a_failed_chunk_later_chunks_are_discarded_until_last(smtp):
    d = opened(smtp)
    lines = d.send(b"BDAT 0\r\nBDAT 4\r\nabcdBDAT 2 LAST\r\nefMAIL FROM:<a@b.test>\r\n")
    assert lines == ["551 5.7.1 Null BDAT request",
                     "551 5.0.0 Discarded 4 bytes after earlier error",
                     "551 5.0.0 Discarded 2 bytes after earlier error", "250 2.1.0 Ok"]
    assert kinds(d, server.Reset) == [server.Reset()]
    assert kinds(d, server.Data, server.MessageChunk, server.MessageEnd) == []


def test_rset_ends_a_failed_bdat_transaction(smtp):
    d = opened(smtp)
    assert d.send(b"BDAT 0\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n") == [
        "551 5.7.1 Null BDAT request", "250 2.0.0 Ok", "250 2.1.0 Ok"]


@pytest.mark.parametrize("command, reply", [
    (b"DATA", "503 5.5.1 Error: DATA after BDAT"),
    (b"RCPT TO:<z@y.test>", "503 5.5.1 Error: RCPT after BDAT"),
    (b"MAIL FROM:<a@b.test>", "503 5.5.1 Error: MAIL after BDAT"),
])
def test_data_rcpt_mail_inside_a_bdat_transaction_are_503_and_it_goes_on(smtp, command, reply):
    d = opened(smtp)
    assert d.send(b"BDAT 3\r\nabc" + command + b"\r\n") == [OK_CHUNK.format(3), reply]
    assert d.send(b"BDAT 3 LAST\r\ndef") == ["250 2.0.0 Ok"]
    assert d.message() == b"abcdef"
    assert len(kinds(d, server.RcptTo)) == 1


def test_size_limit_counts_every_chunk(smtp):
    d = opened(smtp, message_size_limit=10)
    assert d.send(b"BDAT 6\r\n123456") == [OK_CHUNK.format(6)]
    # the chunk that crosses the limit is read whole (its bytes are not commands), then 552
    assert d.send(b"BDAT 5\r\nRSET\r") == ["552 5.3.4 Chunk exceeds message size limit"]
    assert kinds(d, server.Reset) == [server.Reset()]  # the application drops the message
    assert d.send(b"BDAT 1 LAST\r\nx") == ["551 5.0.0 Discarded 1 bytes after earlier error"]
    assert d.send(b"MAIL FROM:<a@b.test>\r\n") == ["250 2.1.0 Ok"]
    assert d.message() == b"123456"
    assert kinds(d, server.MessageEnd) == []


def test_size_limit_reached_exactly_is_accepted(smtp):
    d = opened(smtp, message_size_limit=10)
    assert codes(d.send(b"BDAT 6\r\n123456BDAT 4 LAST\r\n7890")) == ["250", "250"]
    assert kinds(d, server.MessageEnd) == [server.MessageEnd(chunked_size=10)]


def test_oversized_last_chunk_is_552_and_ends_the_transaction(smtp):
    d = opened(smtp, message_size_limit=4)
    assert d.send(b"BDAT 5 LAST\r\n12345MAIL FROM:<a@b.test>\r\n") == [
        "552 5.3.4 Chunk exceeds message size limit", "250 2.1.0 Ok"]


def test_first_chunk_refused_by_the_application_is_read_then_refused(smtp):
    refusal = Reply(554, "5.7.1 <DATA>: Data command rejected")
    d = opened(smtp, refuse=lambda e: refusal if isinstance(e, server.Data) else None)
    lines = d.send(b"BDAT 4\r\nNOOPBDAT 2 LAST\r\nxyNOOP\r\n")
    assert lines == [str(refusal), "551 5.0.0 Discarded 2 bytes after earlier error",
                     "250 2.0.0 Ok"]
    assert kinds(d, server.MessageChunk, server.MessageEnd) == []


def test_message_end_refused_by_the_application_returns_to_idle(smtp):
    full = Reply(452, "4.3.1 Insufficient system storage")
    d = opened(smtp, refuse=lambda e: full if isinstance(e, server.MessageEnd) else None)
    assert d.send(b"BDAT 2 LAST\r\nabMAIL FROM:<a@b.test>\r\n") == [str(full), "250 2.1.0 Ok"]


def test_rset_after_chunks_abandons_the_message(smtp):
    d = opened(smtp)
    assert d.send(b"BDAT 3\r\nabcRSET\r\n") == [OK_CHUNK.format(3), "250 2.0.0 Ok"]
    assert kinds(d, server.Reset) == [server.Reset()]
    assert d.session.state is server.State.IDLE
    assert codes(d.send(TXN[13:] + b"BDAT 1 LAST\r\nz")) == ["250", "250", "250"]


def test_quit_after_chunks_closes(smtp):
    d = opened(smtp)
    assert d.send(b"BDAT 3\r\nabcQUIT\r\n") == [OK_CHUNK.format(3), "221 2.0.0 Bye"]
    assert d.events[-1] == server.Closed(during="QUIT", quit=True)


def test_lost_connection_inside_a_chunk_is_reported_after_bdat(smtp):
    d = opened(smtp)
    d.send(b"BDAT 100\r\npartial")
    d.session.receive_data(b"")
    d.pump()
    assert d.events[-1] == server.Closed(during="BDAT", quit=False)


def test_chunk_bytes_wait_while_the_first_chunk_is_unanswered(smtp):
    """The Data request holds the chunk in the buffer until the application answers it."""
    d = opened(smtp)
    d.session.receive_data(b"BDAT 3 LAST\r\nabc")
    assert d.session.next_event() == server.Data(bdat=True)
    assert d.session.next_event() is None
    d.session.accept()
    assert d.session.data_to_send() == b""  # no 354 for BDAT
    assert d.session.next_event() == server.MessageChunk(b"abc")
    assert d.session.next_event() == server.MessageEnd(chunked_size=3)


def test_first_chunk_answered_421_closes_at_once(smtp):
    bye = Reply(421, "4.3.2 Service shutting down, closing transmission channel")
    d = opened(smtp, refuse=lambda e: bye if isinstance(e, server.Data) else None)
    assert d.send(b"BDAT 100\r\npartial") == [str(bye)]
    assert d.session.closed
    assert d.events[-1] == server.Closed(during="BDAT", quit=False)
