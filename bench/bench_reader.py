"""Compiled vs pure reader: pipelined command lines, DATA scanning of realistic messages, and
BDAT chunks read by byte count.

Run: pytest bench --benchmark-enable -p no:cacheprovider (see bench/README.md). Each group holds
the two twins side by side.
"""

import random

import pytest

KB = 1024


def command_stream(transactions=200):
    """A pipelining client's command lines: per transaction MAIL, 5 RCPT, RSET/NOOP."""
    lines = []
    for n in range(transactions):
        lines.append(b"MAIL FROM:<sender%d@example.org> SIZE=%d BODY=8BITMIME" % (n, 1000 + n))
        lines += [b"RCPT TO:<rcpt%d.%d@example.net> NOTIFY=NEVER" % (n, r) for r in range(5)]
        lines += [b"NOOP", b"RSET"]
    return b"".join(line + b"\r\n" for line in lines), len(lines)


def message(size):
    """A text message of about ``size`` bytes: 76-char lines with sentence dots, and a
    dot-stuffed line now and then (as a client sends a line that began with '.')."""
    rng = random.Random(size)
    words = [b"mail", b"transfer", b"agent", b"queue", b"relay", b"the", b"of", b"and", b"spool"]
    out = [b"From: a@example.org\r\nTo: b@example.net\r\nSubject: benchmark\r\n\r\n"]
    total = len(out[0])
    n = 0
    while total < size:
        n += 1
        line = b" ".join(rng.choice(words) for _ in range(12))[:74].rstrip() + b"."
        if n % 40 == 0:
            line = b".." + line[2:]
        out.append(line + b"\r\n")
        total += len(line) + 2
    return b"".join(out) + b".\r\n"


def read_lines(Reader, chunks):
    reader = Reader()
    count = 0
    for chunk in chunks:
        reader.feed(chunk)
        while reader.read_line() is not None:
            count += 1
    return count


def read_message(Reader, chunks):
    reader = Reader()
    reader.start_data()
    size = 0
    for chunk in chunks:
        reader.feed(chunk)
        payload, done = reader.read_data()
        size += len(payload)
    assert done
    return size


def read_chunked(Reader, pieces, chunk_size):
    """A BDAT client's stream: ``BDAT n`` lines, each followed by n bytes read by count."""
    reader = Reader()
    size = 0
    left = 0
    for piece in pieces:
        reader.feed(piece)
        while True:
            if left == 0:
                line = reader.read_line()
                if line is None:
                    break
                left = int(line.split()[1])
            payload = reader.read_exact(left)
            if not payload:
                break
            left -= len(payload)
            size += len(payload)
    return size


def split(data, chunk_size):
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def test_pipelined_command_lines(benchmark, twin):
    stream, expected = command_stream()
    chunks = split(stream, 4 * KB)
    benchmark.group = "command lines, 4 KB chunks"
    assert benchmark(read_lines, twin("reader").Reader, chunks) == expected


@pytest.mark.parametrize("chunk_size", [4 * KB, 64 * KB], ids=["4KB-chunks", "64KB-chunks"])
@pytest.mark.parametrize("size", [1 * KB, 20 * KB, 100 * KB], ids=["1KB", "20KB", "100KB"])
def test_data_scanning(benchmark, twin, size, chunk_size):
    data = message(size)
    chunks = split(data, chunk_size)
    benchmark.group = f"DATA {size // KB} KB message, {chunk_size // KB} KB chunks"
    payload_size = benchmark(read_message, twin("reader").Reader, chunks)
    assert payload_size == len(data) - 3 - data.count(b"\r\n..")


def test_data_scanning_bare_lf(benchmark, twin):
    """The normalize path: a client that ends its lines in bare LF (each becomes CRLF, a dot
    after one is unstuffed). Only such input leaves the fast path measured above."""
    data = message(100 * KB)[:-3].replace(b"\r\n", b"\n") + b"\r\n.\r\n"
    chunks = split(data, 64 * KB)
    benchmark.group = "DATA 100 KB message with bare LF line ends, 64 KB chunks"
    payload_size = benchmark(read_message, twin("reader").Reader, chunks)
    lines = data.count(b"\n") - 1
    assert payload_size == len(data) - 3 + lines - 1 - data.count(b"\n..")


@pytest.mark.parametrize("size", [20 * KB, 1024 * KB], ids=["20KB", "1MB"])
def test_bdat_chunks(benchmark, twin, size):
    body = message(size)[:-3]
    bdat_size = 64 * KB
    stream = b"".join(b"BDAT %d\r\n" % len(chunk) + chunk for chunk in split(body, bdat_size))
    pieces = split(stream, 16 * KB)
    benchmark.group = f"BDAT {size // KB} KB message, 64 KB chunks, 16 KB reads"
    assert benchmark(read_chunked, twin("reader").Reader, pieces, bdat_size) == len(body)
