"""Idle SMTP sessions: the server's memory per session, and the connection cap under a flood.

    ulimit -n 20000        # if the hard limit is lower: the script raises the soft one itself
    python bench/idle_sessions.py [--sessions 10000] [--flood 500]

Starts ``tern serve`` (worker_count = 1, smtpd_connection_limit = sessions + 10) on a loopback
port with a spool in a temporary directory, opens ``--sessions`` idle SMTP sessions to it from
this process (asyncio; each reads the 220 greeting and stays open), and reads the server's
VmRSS (/proc/PID/status) before and after: (after - before) / sessions = RSS per session (goal:
at most 20 KB). Then it opens ``--flood`` more connections: the first 10 fill the cap, every
one beyond gets ``421 4.7.0 … Error: too many connections``, and one of the idle sessions still
completes NOOP and QUIT. Every step is bounded in time; the server is stopped at the end.

Measured (2-core shared VM, Python 3.11.7, uvloop, compiled reader; 2026-11-21):

    idle sessions:  10000/10000 greeted in 0.9 s
    server VmRSS:   33224 kB before, 101544 kB after → 6.8 KB per session (goal ≤ 20 KB)
    flood of 500: 10 greeted (cap filled), 490 refused, 0 errors; 490 refusals logged
    refusal:        421 4.7.0 mx.idle.test Error: too many connections
    existing session after the flood: 250 2.0.0 Ok / 221 2.0.0 Bye

    (TERN_PURE=1, the pure-Python reader: 2.9 KB per session; the compiled reader's own buffer
    is most of the difference.)

Both processes need ~sessions + flood file descriptors: the script raises its RLIMIT_NOFILE
soft limit to what it needs (up to the hard limit) before starting the server, which inherits
it; when the hard limit is too low, raise it (``ulimit -Hn``, limits.conf) or pass fewer
``--sessions``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP_MARGIN = 10  # smtpd_connection_limit = sessions + CAP_MARGIN: "just above what is open"
STEP_TIMEOUT = 120.0  # seconds any one step may take


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_server(directory: Path, port: int, limit: int) -> subprocess.Popen:
    config = directory / "tern.toml"
    config.write_text(
        'myhostname = "mx.idle.test"\n'
        f'queue_directory = "{directory / "spool"}"\n'
        f'maillog_file = "{directory / "maillog"}"\n'
        "worker_count = 1\n"
        f"smtpd_connection_limit = {limit}\n"
        "smtpd_timeout = 3600\n"
        f'[[listen]]\naddress = "127.0.0.1:{port}"\nservice = "smtp"\n')
    process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--config", str(config)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tern serve exited: {process.stderr.read().decode().strip()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.settimeout(5)
            if s.recv(512).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("tern serve did not answer within 30 s")


async def open_session(port: int) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await asyncio.wait_for(reader.readline(), 30)
    return greeting, reader, writer


async def open_many(port: int, count: int, parallel: int = 256) -> list:
    gate = asyncio.Semaphore(parallel)  # below the listen backlog (1024)

    async def one():
        async with gate:
            return await open_session(port)

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), STEP_TIMEOUT)


async def settle_rss(pid: int, seconds: float = 2.0) -> int:
    await asyncio.sleep(seconds)
    return vm_rss_kb(pid)


async def scenario(port: int, pid: int, sessions: int, flood: int) -> dict:
    figures: dict = {"before_kb": await settle_rss(pid)}
    started = time.monotonic()
    idle = await open_many(port, sessions)
    figures["open_seconds"] = time.monotonic() - started
    figures["greeted"] = sum(g.startswith(b"220") for g, _, _ in idle)
    figures["after_kb"] = await settle_rss(pid)

    # the flood: CAP_MARGIN more fill the cap, the rest must be refused with 421
    results = await asyncio.wait_for(asyncio.gather(
        *(open_session(port) for _ in range(flood)), return_exceptions=True), STEP_TIMEOUT)
    opened = [r for r in results if not isinstance(r, BaseException)]
    figures["flood_greeted"] = sum(g.startswith(b"220") for g, _, _ in opened)
    refusals = [g for g, _, _ in opened if g.startswith(b"421")]
    figures["flood_refused"] = len(refusals)
    figures["flood_errors"] = len(results) - len(opened)
    figures["refusal"] = refusals[0].decode().strip() if refusals else ""
    figures["rss_flood_kb"] = vm_rss_kb(pid)

    # an existing session still works
    _, reader, writer = idle[0]
    writer.write(b"NOOP\r\nQUIT\r\n")
    figures["existing"] = [
        (await asyncio.wait_for(reader.readline(), 10)).decode().strip() for _ in range(2)]

    for _, _, writer in idle[1:] + opened:
        writer.transport.abort()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--flood", type=int, default=500)
    args = parser.parse_args()
    needed = args.sessions + args.flood + 200
    soft = raise_nofile(needed)
    if soft < needed:
        print(f"RLIMIT_NOFILE is {soft}, {needed} needed: raise the hard limit (ulimit -Hn) or "
              f"pass --sessions {max(soft - args.flood - 200, 0)}", file=sys.stderr)
        return 2
    limit = args.sessions + CAP_MARGIN
    with tempfile.TemporaryDirectory(prefix="tern-idle-") as tmp:
        directory = Path(tmp)
        port = free_port()
        server = start_server(directory, port, limit)
        try:
            try:
                import uvloop
                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            figures = runner(scenario(port, server.pid, args.sessions, args.flood))
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log = (directory / "maillog").read_text()
    refused_logged = log.count("warning: connection limit")
    per_session = (figures["after_kb"] - figures["before_kb"]) * 1024 / args.sessions
    print(f"tern serve, 1 worker, smtpd_connection_limit = {limit}")
    print(f"idle sessions:  {figures['greeted']}/{args.sessions} greeted in "
          f"{figures['open_seconds']:.1f} s")
    print(f"server VmRSS:   {figures['before_kb']} kB before, {figures['after_kb']} kB after "
          f"→ {per_session / 1024:.1f} KB per session (goal ≤ 20 KB)")
    print(f"flood of {args.flood}: {figures['flood_greeted']} greeted (cap filled), "
          f"{figures['flood_refused']} refused, {figures['flood_errors']} errors; "
          f"{refused_logged} refusals logged")
    print(f"refusal:        {figures['refusal']}")
    print(f"existing session after the flood: {' / '.join(figures['existing'])}")
    ok = (figures["greeted"] == args.sessions
          and figures["flood_greeted"] == min(CAP_MARGIN, args.flood)
          and figures["flood_refused"] == max(args.flood - CAP_MARGIN, 0)
          and figures["refusal"].startswith("421 4.7.0")
          and figures["existing"][0].startswith("250") and figures["existing"][1].startswith("221"))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
