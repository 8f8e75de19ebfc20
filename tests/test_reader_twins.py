"""Differential test: the compiled reader and its pure-Python twin (the oracle) agree.

For arbitrary bytes (biased toward b"\\r\\n.xA"), arbitrary chunkings and an arbitrary sequence
of read_line / start_data / read_data / read_exact / peek calls, both return identical results or
raise the same exception, hold the same number of bytes and agree on ``bare_lf`` after every step.
"""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import speedups

compiled = speedups.load("reader", pure=False)
pure = speedups.load("reader", pure=True)

pytestmark = pytest.mark.skipif(
    not compiled.__name__.startswith("engine._compiled."), reason="compiled reader not built"
)

OPERATIONS = ("read_line", "start_data", "read_data", "peek")

# Pieces that make line ends, dot lines and their near misses likely; now and then any bytes.
alphabet = st.sampled_from(
    [b"\r", b"\n", b".", b"x", b"A", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"..", b"\n.\n"]
)
pieces = st.one_of(alphabet, alphabet, alphabet, st.binary(max_size=6))
chunks = st.lists(pieces, max_size=8).map(b"".join)
steps = st.one_of(
    chunks.map(lambda chunk: ("feed", chunk)),
    st.sampled_from(OPERATIONS).map(lambda op: (op,)),
    st.integers(-1, 12).map(lambda count: ("read_exact", count)),  # a BDAT chunk's bytes
)
# (max_line_length, script): the script is a list of ("feed", bytes) or (operation,).
sessions = st.tuples(st.sampled_from([0, 1, 2, 5, 16, 2048]), st.lists(steps, max_size=40))


def run(module, max_line_length, script):
    """Everything observable while ``script`` runs against ``module.Reader``."""
    reader = module.Reader(max_line_length)
    seen = []
    for name, *args in script:
        if name == "peek":
            args = [5]
        try:
            result = getattr(reader, name)(*args)
        except Exception as exc:  # the same class and args are expected from both twins
            result = (type(exc), exc.args)
        seen.append((name, result, len(reader), reader.bare_lf))
    return seen


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions)
@example(  # read_data without start_data must not leave read_line's search offset stale
    (2048, [("feed", b"abc"), ("read_line",), ("read_data",), ("feed", b"x\n"), ("read_line",)])
)
def test_compiled_and_pure_twins_agree(session):
    max_line_length, script = session
    assert run(compiled, max_line_length, script) == run(pure, max_line_length, script)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 700))
@example(b"a\n.\nMAIL FROM:<x@y>\r\n\n.\r\n", 3)  # bare LFs around dot lines, split
def test_twins_agree_on_a_whole_message_in_fixed_chunks(data, chunk_size):
    message = data + b"\r\n.\r\nQUIT\r\n"
    script = [("start_data",)]
    for start in range(0, len(message), chunk_size):
        script += [("feed", message[start : start + chunk_size]), ("read_data",)]
    script += [("read_data",), ("read_line",), ("read_line",)]
    assert run(compiled, 2048, script) == run(pure, 2048, script)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(1, 200),
       st.binary(max_size=40))
def test_twins_agree_on_bdat_chunks_in_fixed_pieces(chunks, piece_size, after):
    """BDAT: each chunk's bytes by count (whatever they hold: dots, bare LFs, command-like
    lines), the command lines after them; the stream cut in arbitrary pieces."""
    stream = b"".join(b"BDAT %d\r\n" % len(chunk) + chunk for chunk in chunks) + after
    script = []
    for start in range(0, len(stream), piece_size):
        script.append(("feed", stream[start : start + piece_size]))
    for chunk in chunks:
        script += [("read_line",)] + [("read_exact", len(chunk))] * 2
    script += [("read_line",), ("read_line",)]
    assert run(compiled, 2048, script) == run(pure, 2048, script)
