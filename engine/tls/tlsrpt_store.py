"""Where TLS-RPT session results wait for the daily report: one JSON line per result in
``<queue_directory>/tlsrpt/DAY.PID.jsonl`` (each worker process its own file, so no lock), read
back by day and marked sent by renaming the files ``….sent``. Results are statistics: a crash
may lose the last lines, never a message. Only written when ``smtp_tlsrpt_enable`` is set, one
short append per TLS session (off the per-command path). Trusts its own files, but skips a
line it cannot read.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

from engine.tls.tlsrpt import SessionResult

DIRECTORY = "tlsrpt"


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


class ResultStore:
    """The result files of one queue directory."""

    def __init__(self, queue_directory: str | Path) -> None:
        self.directory = Path(queue_directory) / DIRECTORY

    def record(self, result: SessionResult) -> None:
        """Append one result to this process's file of its day."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{result.day}.{os.getpid()}.jsonl"
        with path.open("a", encoding="utf-8") as out:
            out.write(result.to_json() + "\n")

    def files(self, day: str) -> list[Path]:
        """The unsent result files of ``day`` (every process's)."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"{day}.*.jsonl"))

    def days(self) -> list[str]:
        """The days with unsent results, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted({path.name.split(".", 1)[0] for path in self.directory.glob("*.jsonl")})

    def read(self, day: str) -> list[SessionResult]:
        results = []
        for path in self.files(day):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    results.append(SessionResult.from_json(line))
                except (ValueError, TypeError):
                    continue  # a torn last line after a crash
        return results

    def keep(self, day: str, results: list[SessionResult]) -> None:
        """Store ``results`` of ``day`` again, in a file of their own (after mark_sent of the
        files they came from), for the next attempt at the day's reports."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{day}.retry-{os.getpid()}-{time.monotonic_ns()}.jsonl"
        path.write_text("".join(r.to_json() + "\n" for r in results), encoding="utf-8")

    def mark_sent(self, paths: list[Path]) -> None:
        for path in paths:
            path.rename(path.with_name(path.name + ".sent"))
