"""Profile Tern under load: smtp-source → Tern (in-process, uvloop, cProfile) → smtp-sink.

    python bench/profile_load.py                    # 20 sessions, 5,000 messages of 1 KiB
    python bench/profile_load.py -m 2000 -s 10 --out /tmp/tern.prof
    python bench/profile_load.py --no-profile        # the same load, unprofiled figures only
    py-spy record --threads --format raw -o spy.txt -- python bench/profile_load.py --no-profile

Starts Postfix's /usr/sbin/smtp-sink on a free loopback port as the relayhost, runs
``engine.serve.serve`` on uvloop in this process with a temporary configuration (worker_count = 1,
its own queue_directory and maillog_file), drives it with
``smtp-source -s S -m M -l L -f a@example.org -t b@example.net 127.0.0.1:PORT`` and waits until
every message is delivered (``status=sent`` in the maillog) or the time limit passes. Prints
accepted msgs/s (smtp-source's run), end-to-end msgs/s (smtp-source start to last delivery), the
top functions by own and cumulative time, and the group-commit figure: new messages per LMDB
commit (LmdbSpool.messages_committed / LmdbSpool.commits).

cProfile sees only the event-loop thread: the spool's writer thread (LMDB transactions, fsync)
is not in the profile; its commits are counted and timed by a wrapper around LmdbSpool._commit.
Loopback only; every step is bounded (--timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine import speedups  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.serve import serve  # noqa: E402
from engine.spool.lmdb_spool import LmdbSpool  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait until something listens on 127.0.0.1:port, from /proc/net/tcp (a probe connection
    would count as a session for smtp-sink)."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {proc.returncode}")
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        if any(p[1] == want and p[3] == "0A" for p in (line.split() for line in table)):
            return
        time.sleep(0.02)
    raise RuntimeError("smtp-sink did not start listening")


class SpoolProbe:
    """Hooks LmdbSpool: remembers the instances serve() opens, and times each commit."""

    def __init__(self) -> None:
        self.spools: list[LmdbSpool] = []
        self.commit_seconds = 0.0
        self.commits_with_new = 0
        self._init = LmdbSpool.__init__
        self._commit = LmdbSpool._commit

    def install(self) -> None:
        probe = self

        def init(spool, *args, **kwargs):
            probe._init(spool, *args, **kwargs)
            probe.spools.append(spool)

        def commit(spool, ops):
            started = time.perf_counter()
            before = spool.messages_committed
            try:
                return probe._commit(spool, ops)
            finally:
                probe.commit_seconds += time.perf_counter() - started
                if spool.messages_committed > before:
                    probe.commits_with_new += 1

        LmdbSpool.__init__ = init
        LmdbSpool._commit = commit

    def uninstall(self) -> None:
        LmdbSpool.__init__ = self._init
        LmdbSpool._commit = self._commit


class SentCounter:
    """Counts ``status=sent`` lines in the maillog as it grows (read incrementally)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0
        self.tail = b""
        self.last_at = 0.0

    def poll(self) -> int:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return self.count
        if chunk:
            self.offset += len(chunk)
            data = self.tail + chunk
            lines = data.split(b"\n")
            self.tail = lines.pop()
            found = sum(b"status=sent" in line for line in lines)
            if found:
                self.count += found
                self.last_at = time.perf_counter()
        return self.count


def shorten_paths(text: str) -> str:
    """Paths relative to the repository, the stdlib and site-packages (keeps engine/... apart)."""
    prefixes = {str(REPO) + "/"}
    prefixes.update(path + "/" for path in sysconfig.get_paths().values())
    for prefix in sorted(prefixes, key=len, reverse=True):
        text = text.replace(prefix, "")
    return text


def write_config(directory: Path, port: int, sink_port: int) -> Path:
    path = directory / "tern.toml"
    path.write_text(
        "\n".join([
            'myhostname = "mx.tern.test"',
            f'queue_directory = "{directory / "spool"}"',
            f'maillog_file = "{directory / "maillog"}"',
            f'relayhost = "[127.0.0.1]:{sink_port}"',
            "worker_count = 1",
            "[[listen]]",
            f'address = "127.0.0.1:{port}"',
            'service = "smtp"',
        ]) + "\n")
    return path


async def run_load(args, config, port: int, counter: SentCounter, profiler: cProfile.Profile):
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve(config, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 15)
    figures: dict = {}
    if not args.no_profile:
        profiler.enable()
    try:
        started = time.perf_counter()
        source = await asyncio.create_subprocess_exec(
            SMTP_SOURCE, "-s", str(args.sessions), "-m", str(args.messages),
            "-l", str(args.length), "-f", "a@example.org", "-t", "b@example.net",
            f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(source.communicate(), args.timeout)
        except TimeoutError:
            source.kill()
            await source.wait()
            raise RuntimeError("smtp-source did not finish in time") from None
        figures["accept_seconds"] = time.perf_counter() - started
        figures["source_rc"] = source.returncode
        figures["source_output"] = output.decode(errors="replace").strip()
        deadline = started + args.timeout
        while counter.poll() < args.messages and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        figures["sent"] = counter.count
        figures["end_seconds"] = (counter.last_at or time.perf_counter()) - started
    finally:
        profiler.disable()
        stop.set()
        await asyncio.wait_for(server, 30)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-s", "--sessions", type=int, default=20)
    parser.add_argument("-m", "--messages", type=int, default=5000)
    parser.add_argument("-l", "--length", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole load")
    parser.add_argument("--no-profile", action="store_true",
                        help="same load without cProfile: throughput and group commit only")
    parser.add_argument("--out", help="also save the cProfile stats here (pstats / snakeviz)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not os.access(tool, os.X_OK):
            parser.error(f"{tool} not found (Postfix's test tools)")
    import uvloop

    directory = Path(tempfile.mkdtemp(prefix="tern-profile-"))
    directory.chmod(0o755)
    sink_port, port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([SMTP_SINK, *user, "-h", "smtp-sink", f"inet:127.0.0.1:{sink_port}",
                             "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = SpoolProbe()
    profiler = cProfile.Profile()
    try:
        wait_listening(sink_port, sink)
        config = load_config(write_config(directory, port, sink_port))
        counter = SentCounter(directory / "maillog")
        probe.install()
        figures = uvloop.run(run_load(args, config, port, counter, profiler))
    finally:
        probe.uninstall()
        sink.terminate()
        try:
            sink.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    spool = probe.spools[0]
    accepted = args.messages / figures["accept_seconds"]
    end_to_end = figures["sent"] / figures["end_seconds"] if figures["end_seconds"] else 0.0
    print(f"Python {sys.version.split()[0]}, uvloop {uvloop.__version__}, "
          f"hot paths {speedups.implementations()}")
    said = f" — {figures['source_output']}" if figures["source_output"] else ""
    print(f"load: smtp-source -s {args.sessions} -m {args.messages} -l {args.length} "
          f"(exit {figures['source_rc']}){said}")
    print(f"accepted:   {args.messages} messages in {figures['accept_seconds']:.2f} s "
          f"= {accepted:,.0f} msgs/s (smtp-source start to exit"
          f"{'' if args.no_profile else ', under cProfile'})")
    print(f"end-to-end: {figures['sent']} delivered in {figures['end_seconds']:.2f} s "
          f"= {end_to_end:,.0f} msgs/s (smtp-source start to the last status=sent)")
    per_commit = spool.messages_committed / spool.commits if spool.commits else 0.0
    per_new = (spool.messages_committed / probe.commits_with_new
               if probe.commits_with_new else 0.0)
    print(f"group commit: {spool.messages_committed} new messages in {spool.commits} LMDB "
          f"commits = {per_commit:.2f} per commit (all commits, incl. delivery updates/removals); "
          f"{probe.commits_with_new} commits carried new messages = {per_new:.2f} per such commit; "
          f"writer thread spent {probe.commit_seconds:.2f} s in commits "
          f"({1000 * probe.commit_seconds / max(spool.commits, 1):.2f} ms each)")
    if args.no_profile:
        return 0 if figures["sent"] >= args.messages and figures["source_rc"] == 0 else 1
    stats = pstats.Stats(profiler)
    print(f"profile (event-loop thread): {stats.total_calls:,} calls, "
          f"{stats.total_tt:.2f} s own time in total")
    if args.out:
        stats.dump_stats(args.out)
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats(key).print_stats(args.top)
        text = shorten_paths(buffer.getvalue())
        start = text.find("   ncalls")
        print(f"\n== top {args.top} by {title} ==")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())
    return 0 if figures["sent"] >= args.messages and figures["source_rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
