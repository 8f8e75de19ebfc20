"""DATA reading does not depend on how the bytes were cut into reads.

The same DATA stream fed whole, in random pieces or a byte at a time must give the same message
content, the same end of data and the same bytes left for the next command, in both reader
twins. A real client's CRLF.CRLF may land across TCP segments after a line that ended in a bare
LF (the normalize case); a reader that lost the end there would swallow the next commands.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import speedups

READERS = [speedups.load("reader", pure=True)]
_compiled = speedups.load("reader", pure=False)
if _compiled.__name__.startswith("engine._compiled."):
    READERS.append(_compiled)

pieces = st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"..", b"\n."])
bodies = st.lists(pieces, max_size=30).map(b"".join)
TAIL = b"\r\n.\r\nNOOP\r\n"


def read(module, parts):
    """(content, ended, the next command line) after feeding ``parts`` in DATA mode."""
    reader = module.Reader(2048)
    reader.start_data()
    content, ended = [], False
    for part in parts:
        reader.feed(part)
        while not ended:
            chunk, ended = reader.read_data()
            content.append(chunk)
            if not chunk:
                break
    return b"".join(content), ended, reader.read_line() if ended else None


def cuts(data, points):
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("module", READERS, ids=lambda m: m.__name__)
@settings(max_examples=400, deadline=None)
@given(body=bodies, points=st.lists(st.integers(0, 200), max_size=5))
def test_data_result_is_independent_of_read_boundaries(module, body, points):
    data = body + TAIL
    whole = read(module, [data])
    assert whole[1]  # the CRLF.CRLF after a CRLF-ended line always ends DATA
    assert read(module, cuts(data, points)) == whole
    assert read(module, [data[i:i + 1] for i in range(len(data))]) == whole


@pytest.mark.parametrize("module", READERS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("parts", [
    [b"a\nb", b"\r\n.", b"\r\nNOOP\r\n"],
    [b"\na", b"\r\n.\r", b"\nNOOP\r\n"],
    [b"a\n\r", b"\n.", b"\r\nNOOP\r\n"],
])
def test_the_end_after_a_bare_lf_line_is_found_across_reads(module, parts):
    content, ended, after = read(module, parts)
    assert ended and after == b"NOOP"
    assert b"NOOP" not in content
