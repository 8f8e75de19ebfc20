"""Behaviour of the SMTP input buffer (engine.smtp.reader and its compiled twin).

Every case runs against both twins (the ``impl`` fixture) and, as h11's tests/test_io.py::tr()
does, is fed whole, byte-at-a-time, and with trailing data left in the buffer.
"""

import pytest

from engine.smtp.reader import LineTooLong

TOO_LONG = "LineTooLong"  # stands for a raised LineTooLong in a list of read_line results


@pytest.fixture
def Reader(impl):
    return impl("reader").Reader


def drain_lines(reader):
    """Every complete line now in ``reader``; a raised LineTooLong shows as TOO_LONG."""
    got = []
    while True:
        try:
            line = reader.read_line()
        except LineTooLong:
            got.append(TOO_LONG)
            continue
        if line is None:
            return got
        assert type(line) is bytes
        got.append(line)


def tr_lines(Reader, data, expected, **kwargs):
    """``data`` yields the results ``expected`` fed whole, byte-at-a-time, and with trailing
    data, which stays buffered."""
    reader = Reader(**kwargs)
    reader.feed(data)
    assert drain_lines(reader) == expected
    assert len(reader) == 0

    reader = Reader(**kwargs)
    got = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        got += drain_lines(reader)
    assert got == expected
    assert len(reader) == 0

    reader = Reader(**kwargs)
    reader.feed(data + b"trailing")
    assert drain_lines(reader) == expected
    assert len(reader) == len(b"trailing")
    reader.feed(b"\r\n")
    assert drain_lines(reader) == [b"trailing"]


def drain_data(reader):
    """All payload now available in ``reader`` and whether end-of-data was reached."""
    chunks = []
    while True:
        chunk, done = reader.read_data()
        assert type(chunk) is bytes
        chunks.append(chunk)
        if done or not chunk:
            return b"".join(chunks), done


def tr_data(Reader, data, payload):
    """``data`` (ending with the end-of-data line) yields ``payload`` fed whole,
    byte-at-a-time (ending exactly at the last byte), and with a pipelined command after it."""
    reader = Reader()
    reader.start_data()
    reader.feed(data)
    assert drain_data(reader) == (payload, True)
    assert len(reader) == 0

    reader = Reader()
    reader.start_data()
    got = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        chunk, done = reader.read_data()
        got.append(chunk)
        assert done == (i == len(data) - 1)
    assert b"".join(got) == payload
    assert len(reader) == 0

    reader = Reader()
    reader.start_data()
    reader.feed(data + b"QUIT\r\n")
    assert drain_data(reader) == (payload, True)
    assert reader.read_line() == b"QUIT"


# -- command lines ---------------------------------------------------------------------------


def test_twins_raise_the_same_exception_class(impl):
    assert impl("reader").LineTooLong is LineTooLong


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"EHLO client.example\r\n", [b"EHLO client.example"]),
        (b"NOOP\r\n", [b"NOOP"]),
        (b"\r\n", [b""]),
    ],
)
def test_crlf_ends_a_command_line(Reader, data, expected):
    tr_lines(Reader, data, expected)


def test_bare_lf_ends_a_command_line(Reader):
    tr_lines(Reader, b"EHLO a\nNOOP\r\n", [b"EHLO a", b"NOOP"])
    tr_lines(Reader, b"\n", [b""])


def test_bare_cr_does_not_end_a_command_line(Reader):
    tr_lines(Reader, b"NOOP\rRSET\r\n", [b"NOOP\rRSET"])


def test_cr_before_crlf_stays_in_the_line(Reader):
    tr_lines(Reader, b"NOOP\r\r\n", [b"NOOP\r"])


def test_partial_line_waits_for_its_end(Reader):
    reader = Reader()
    reader.feed(b"MAIL FROM:<a@")
    assert reader.read_line() is None
    assert reader.read_line() is None
    assert len(reader) == len(b"MAIL FROM:<a@")
    reader.feed(b"example.org>\r")
    assert reader.read_line() is None
    reader.feed(b"\n")
    assert reader.read_line() == b"MAIL FROM:<a@example.org>"
    assert reader.read_line() is None
    assert len(reader) == 0


def test_pipelined_lines_come_out_in_order(Reader):
    tr_lines(
        Reader,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n"
        b"DATA\r\n",
        [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"RCPT TO:<c@example.net>",
         b"DATA"],
    )


def test_feed_accepts_bytes_like_objects(Reader):
    reader = Reader()
    reader.feed(bytearray(b"NO"))
    reader.feed(memoryview(b"OP\r\n"))
    reader.feed(b"")
    assert reader.read_line() == b"NOOP"


def test_feed_rejects_str(Reader):
    with pytest.raises(TypeError):
        Reader().feed("NOOP\r\n")


def test_line_at_the_limit_is_accepted(Reader):
    tr_lines(Reader, b"x" * 16 + b"\r\n", [b"x" * 16], max_line_length=16)
    tr_lines(Reader, b"x" * 16 + b"\n", [b"x" * 16], max_line_length=16)


def test_line_over_the_limit_raises_once_and_the_session_goes_on(Reader):
    tr_lines(Reader, b"x" * 17 + b"\r\nNOOP\r\n", [TOO_LONG, b"NOOP"], max_line_length=16)
    tr_lines(Reader, b"x" * 17 + b"\nNOOP\n", [TOO_LONG, b"NOOP"], max_line_length=16)
    tr_lines(Reader, b"x" * 5000 + b"\r\nNOOP\r\n", [TOO_LONG, b"NOOP"])


def test_each_over_long_line_raises_once(Reader):
    data = b"a" * 40 + b"\r\nNOOP\r\n" + b"b" * 40 + b"\r\n" + b"c" * 40 + b"\r\nQUIT\r\n"
    tr_lines(Reader, data, [TOO_LONG, b"NOOP", TOO_LONG, TOO_LONG, b"QUIT"], max_line_length=16)


def test_over_long_line_is_refused_before_its_end_arrives(Reader):
    reader = Reader(max_line_length=16)
    reader.feed(b"x" * 18)
    with pytest.raises(LineTooLong):
        reader.read_line()
    reader.feed(b"more of the same line")
    assert reader.read_line() is None
    reader.feed(b"\r\nNOOP\r\n")
    assert reader.read_line() == b"NOOP"


def test_100kb_line_without_line_end_does_not_grow_the_buffer(Reader):
    reader = Reader()
    raised = 0
    for _ in range(100):
        reader.feed(b"x" * 1024)
        try:
            assert reader.read_line() is None
        except LineTooLong:
            raised += 1
        assert len(reader) <= 2048 + 1
    assert raised == 1
    reader.feed(b"\r\nNOOP\r\n")
    assert drain_lines(reader) == [b"NOOP"]


# -- DATA ------------------------------------------------------------------------------------


def test_data_ends_at_crlf_dot_crlf(Reader):
    tr_data(Reader, b"Subject: hi\r\n\r\nbody\r\n.\r\n", b"Subject: hi\r\n\r\nbody\r\n")


def test_empty_message_ends_at_once(Reader):
    tr_data(Reader, b".\r\n", b"")


def test_message_of_one_empty_line(Reader):
    tr_data(Reader, b"\r\n.\r\n", b"\r\n")


def test_payload_keeps_its_crlfs(Reader):
    tr_data(Reader, b"a\r\nb\r\n\r\nc\r\n.\r\n", b"a\r\nb\r\n\r\nc\r\n")


@pytest.mark.parametrize(
    ("data", "payload"),
    [
        (b"..leading dot\r\n.\r\n", b".leading dot\r\n"),
        (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n"),
        (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
        (b"a\r\n.x\r\n.\r\n", b"a\r\nx\r\n"),
        (b"..\r\n..\r\n.\r\n", b".\r\n.\r\n"),
        (b"a\r\n.\rx\r\n.\r\n", b"a\r\n\rx\r\n"),
    ],
)
def test_leading_dot_is_unstuffed(Reader, data, payload):
    tr_data(Reader, data, payload)


def test_dot_inside_a_line_is_kept(Reader):
    tr_data(Reader, b"a.b\r\nend.\r\n.\r\n", b"a.b\r\nend.\r\n")


SMUGGLED = b"MAIL FROM:<x@evil>\r\n"


@pytest.mark.parametrize(
    "smuggled, payload",
    [  # smtpd_forbid_bare_newline = normalize: a bare LF is passed on as CRLF, the dot that
       # begins the next line is unstuffed, and only a "." line ended by CRLF after a line
       # ended by CRLF ends the data. A bare CR is content.
        (b"\n.\n", b"a\r\n\r\n" + SMUGGLED),
        (b"\r.\r", b"a\r.\r" + SMUGGLED),
        (b"\n.\r\n", b"a\r\n\r\n" + SMUGGLED),
        (b"\r.\r\n", b"a\r.\r\n" + SMUGGLED),
        (b"\r\n.\n", b"a\r\n\r\n" + SMUGGLED),
        (b"\r\n.\r", b"a\r\n\r" + SMUGGLED),
        (b"\n.\r", b"a\r\n\r" + SMUGGLED),
    ],
    ids=["lf-dot-lf", "cr-dot-cr", "lf-dot-crlf", "cr-dot-crlf", "crlf-dot-lf", "crlf-dot-cr",
         "lf-dot-cr"],
)
def test_bare_lf_or_cr_dot_does_not_end_data(Reader, smuggled, payload):
    tr_data(Reader, b"a" + smuggled + SMUGGLED + b".\r\n", payload)


def test_bare_lf_dot_at_the_start_does_not_end_data(Reader):
    tr_data(Reader, b"\n.\r\nx\r\n.\r\n", b"\r\n\r\nx\r\n")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_bare_lf_normalised_across_any_chunking(Reader, chunk):
    data = b"a\nb\r\n..c\n..d\r\n.\n.\r\ne\r\n.\r\nQUIT\r\n"
    reader = Reader()
    reader.start_data()
    out, done = [], False
    for start in range(0, len(data), chunk):
        reader.feed(data[start : start + chunk])
        payload, done = reader.read_data()
        out.append(payload)
        if done:
            break
    assert done
    assert b"".join(out) == b"a\r\nb\r\n.c\r\n.d\r\n\r\n\r\ne\r\n"
    assert reader.bare_lf


def test_bare_lf_flag_is_set_by_command_lines_and_data(Reader):
    reader = Reader()
    reader.feed(b"NOOP\r\n")
    assert reader.read_line() == b"NOOP" and not reader.bare_lf
    reader.feed(b"NOOP\n")
    assert reader.read_line() == b"NOOP" and reader.bare_lf
    reader.bare_lf = False
    reader.start_data()
    reader.feed(b"x\r\ny\r\n.\r\n")
    assert reader.read_data() == (b"x\r\ny\r\n", True) and not reader.bare_lf


def test_bytes_after_end_of_data_stay_buffered_for_read_line(Reader):
    reader = Reader()
    reader.feed(b"DATA\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nNO")
    assert reader.read_line() == b"DATA"
    reader.start_data()
    assert reader.read_data() == (b"body\r\n", True)
    assert drain_lines(reader) == [b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"]
    assert len(reader) == 2


def test_second_message_starts_at_a_line_start(Reader):
    reader = Reader()
    reader.start_data()
    reader.feed(b"one\r\n.\r\n")
    assert reader.read_data() == (b"one\r\n", True)
    reader.start_data()
    reader.feed(b"..two\r\n.\r\n")
    assert reader.read_data() == (b".two\r\n", True)


def test_data_payload_is_released_as_it_arrives(Reader):
    reader = Reader()
    reader.start_data()
    line = b"x" * 74 + b"\r\n"
    total = 0
    for _ in range(1400):  # about 100 KB
        reader.feed(line)
        chunk, done = reader.read_data()
        total += len(chunk)
        assert not done
        assert len(reader) <= 2
    reader.feed(b".\r\n")
    chunk, done = reader.read_data()
    assert done
    assert total + len(chunk) == 1400 * len(line)


def test_read_data_before_any_byte_returns_nothing(Reader):
    reader = Reader()
    reader.start_data()
    assert reader.read_data() == (b"", False)


def test_read_data_then_read_line_does_not_join_lines(Reader):
    # Regression: read_data once left the line-end search offset of an earlier read_line
    # pointing past the bytes it consumed, so the next read_line returned b"x\ny".
    reader = Reader()
    reader.feed(b"abc")
    assert reader.read_line() is None
    assert reader.read_data() == (b"abc", False)
    reader.feed(b"x\n")
    assert reader.read_line() == b"x"
    reader.feed(b"y\n")
    assert reader.read_line() == b"y"
