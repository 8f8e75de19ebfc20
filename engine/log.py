"""Postfix-format maillog lines: ``Mon DD HH:MM:SS host tern/SERVICE[pid]: QUEUEID: text``.

Existing tools (pflogsumm, fail2ban filters, log shippers) parse this layout, so every stage logs
through ``Maillog.line`` and the wording of each event follows Postfix. Lines of one event-loop
turn go out in one write (a message makes about seven: one write each was 5% of the loop's time
under load). Trusts its callers.
"""

import asyncio
import os
import sys
import time
from typing import TextIO


def format_delay(seconds: float) -> str:
    """Postfix prints delays with two significant digits below 10 s (``0.12``, ``1.2``, ``34``)."""
    if seconds < 0.1:
        return f"{seconds:.2f}"
    if seconds < 10:
        return f"{seconds:.2g}" if seconds < 1 else f"{seconds:.1f}"
    return f"{seconds:.0f}"


class Maillog:
    """One writer per process, line-buffered so that each event is visible as it happens."""

    def __init__(self, hostname: str, path: str = "", stream: TextIO | None = None) -> None:
        self._host = hostname.split(".")[0] or "localhost"
        self._pid = os.getpid()
        self._stream = stream or (open(path, "a", buffering=1) if path else sys.stderr)  # noqa: SIM115 - lives as long as the process
        self._stamp_second = -1
        self._stamp = ""
        self._pending: list[str] = []
        self._flush_scheduled = False

    def line(self, service: str, text: str) -> None:
        now = int(time.time())
        if now != self._stamp_second:
            self._stamp_second = now
            self._stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        self._pending.append(f"{self._stamp} {self._host} tern/{service}[{self._pid}]: {text}\n")
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tools, start-up errors): write now
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what this loop turn logged, in one write."""
        self._flush_scheduled = False
        if self._pending:
            self._stream.write("".join(self._pending))
            self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._stream not in (sys.stderr, sys.stdout):
            self._stream.close()
