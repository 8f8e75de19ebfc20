"""The maillog: Postfix's line layout, and one write per event-loop turn."""

import asyncio
import io
import re

from engine.log import Maillog, format_delay


class CountingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_line_layout_is_postfix_maillog():
    stream = CountingStream()
    Maillog("mx1.example.test", stream=stream).line("smtp", "QID: to=<a@b.test>, status=sent")
    assert re.fullmatch(r"\w{3} [ \d]\d \d\d:\d\d:\d\d mx1 tern/smtp\[\d+\]: "
                        r"QID: to=<a@b.test>, status=sent\n", stream.getvalue())


def test_lines_of_one_loop_turn_are_one_write():
    async def scenario():
        stream = CountingStream()
        maillog = Maillog("mx.test", stream=stream)
        for i in range(7):
            maillog.line("qmgr", f"line {i}")
        before = stream.writes
        await asyncio.sleep(0)
        return before, stream.writes, stream.getvalue().count("\n")

    assert asyncio.run(scenario()) == (0, 1, 7)


def test_outside_an_event_loop_a_line_is_written_at_once():
    stream = CountingStream()
    Maillog("mx.test", stream=stream).line("master", "fatal")
    assert stream.writes == 1


def test_delays_are_formatted_as_postfix():
    assert [format_delay(x) for x in (0.004, 0.25, 3.14, 42.0)] == ["0.00", "0.25", "3.1", "42"]
