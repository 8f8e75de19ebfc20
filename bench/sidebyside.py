"""Tern and Postfix side by side, under the same smtp-source load, on loopback.

    sudo python bench/sidebyside.py [--quick] [--workers 1,2] [--out bench/results]

Starts one smtp-sink per MTA as its next hop, a Tern server (``python -m engine serve`` with a
TOML in a temp dir) and a throwaway Postfix instance (bench/postfix_instance.py; Debian's package
is installed unconfigured if missing), then for every row of the matrix (message size x
sessions x one or many messages per connection) drives Tern, Postfix, Tern, Postfix (A B A B)
with smtp-source and reports the mean of the two runs of each. With ``--workers 1,2`` (the
default) one Tern server per worker_count runs, and each row goes Tern/1, Tern/2, Postfix,
Tern/1, Tern/2, Postfix; the report adds "Tern with 1 vs 2 workers". Writes sidebyside.md, .json and
.png under --out. bench/sidebyside.md explains the columns. Every process it starts is ended by
its PID, and the temp dirs are removed, also on ^C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from postfix_instance import PostfixInstance, ensure_installed, free_port  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SENDER, RCPT = "a@example.org", "b@example.net"

SIZES = {"1KB": 1024, "20KB": 20 * 1024, "100KB": 100 * 1024}
FULL_COUNT = {"1KB": 2000, "20KB": 2000, "100KB": 1000}
QUICK_COUNT = {"1KB": 1000, "20KB": 1000, "100KB": 500}
QUICK_ROWS = [
    ("1KB", 1, "one"),
    ("1KB", 20, "one"),
    ("1KB", 20, "many"),
    ("20KB", 20, "one"),
    ("100KB", 100, "many"),
]


@dataclass(frozen=True)
class Row:
    size: str
    sessions: int
    per_conn: str  # "one" message per connection, or "many" (smtp-source -d)
    count: int

    @property
    def label(self) -> str:
        return f"{self.size} s={self.sessions} {self.per_conn}/conn"


def matrix(quick: bool) -> list[Row]:
    if quick:
        return [Row(s, n, p, QUICK_COUNT[s]) for s, n, p in QUICK_ROWS]
    return [
        Row(s, n, p, FULL_COUNT[s]) for s in SIZES for n in (1, 20, 100) for p in ("one", "many")
    ]


# ---------------------------------------------------------------- processes and /proc


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu(root: int) -> float:
    """utime+stime of every live process in the tree, plus cutime+cstime (reaped children)."""
    total = 0
    for pid in process_tree(root):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])  # fields 14..17: utime stime cutime cstime
    return total / CLK_TCK


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of Rss, sum of Pss) in bytes over the tree."""
    rss = pss = 0
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return rss, pss


class MemorySampler(threading.Thread):
    """Peak of the tree's summed Rss and Pss, sampled every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while True:
            rss, pss = tree_memory(self.root)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            if self.stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def wait_banner(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 220 on 127.0.0.1:{port} within {timeout}s")


def end_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process we started (and its own session group), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # started with start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class Sink:
    """smtp-sink on a loopback port; counts completed DATA from its ``-c`` counter."""

    def __init__(self):
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, "-c", "-h", "sink.example", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.count = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_banner(self.port, 10)

    def _read(self) -> None:
        pat = re.compile(rb"mesg=(\d+)")
        tail = b""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            tail = (tail + chunk)[-256:]
            found = pat.findall(tail)
            if found:
                self.count = max(self.count, int(found[-1]))

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        end_process(self.proc)


class Tern:
    def __init__(self, sink_port: int, workers: int):
        self.workers = workers
        self.name = f"tern/{workers}w"
        self.dir = Path(tempfile.mkdtemp(prefix=f"tern-bench-tern{workers}w-"))
        self.port = free_port()
        self.config = self.dir / "tern.toml"
        self.config.write_text(
            f"worker_count = {workers}\n"
            f'myhostname = "tern-bench.example"\n'
            f'queue_directory = "{self.dir / "spool"}"\n'
            f'mynetworks = ["127.0.0.0/8"]\n'
            f'relayhost = "[127.0.0.1]:{sink_port}"\n'
            f'maillog_file = "{self.dir / "maillog"}"\n'
            f'[[listen]]\naddress = "127.0.0.1:{self.port}"\nservice = "smtp"\n'
        )
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", "--config", str(self.config)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        try:
            wait_banner(self.port, 30)
        except RuntimeError:
            self.stop()
            raise

    @property
    def root_pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        end_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Postfix:
    name = "postfix"
    workers = None

    def __init__(self, sink_port: int):
        self.inst = PostfixInstance(sink_port)
        self.inst.start()
        self.port = self.inst.port

    @property
    def root_pid(self) -> int:
        pid = self.inst.master_pid()
        if pid is None:
            raise RuntimeError("postfix master pid file missing")
        return pid

    def stop(self) -> None:
        self.inst.stop()


# ---------------------------------------------------------------- latency probe


class Probe(threading.Thread):
    """One extra SMTP session beside smtp-source: timed transactions (MAIL FROM sent .. the reply
    to the end of DATA) on one connection, a message of the row's size every ``pause`` s."""

    def __init__(self, port: int, size: int, pause: float = 0.01, limit: int = 5000):
        super().__init__(daemon=True)
        self.port, self.pause, self.limit = port, pause, limit
        line = b"x" * 78 + b"\r\n"
        body = line * (size // len(line) + 1)
        self.data = (
            b"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: probe\r\n\r\n"
            + body
            + b".\r\n"
        )
        self.samples: list[float] = []
        self.sent = 0
        self.error = ""
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                f = s.makefile("rb")

                def reply() -> bytes:
                    while True:
                        line = f.readline()
                        if not line:
                            raise ConnectionError("connection closed")
                        if line[3:4] != b"-":
                            return line

                reply()
                s.sendall(b"EHLO probe.example\r\n")
                reply()
                while not self.stop_event.is_set() and self.sent < self.limit:
                    t0 = time.perf_counter()
                    s.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
                    assert reply().startswith(b"250")
                    s.sendall(f"RCPT TO:<{RCPT}>\r\n".encode())
                    assert reply().startswith(b"250")
                    s.sendall(b"DATA\r\n")
                    assert reply().startswith(b"354")
                    s.sendall(self.data)
                    r = reply()
                    if not r.startswith(b"250"):
                        raise RuntimeError(f"probe DATA: {r!r}")
                    self.samples.append(time.perf_counter() - t0)
                    self.sent += 1
                    self.stop_event.wait(self.pause)
                s.sendall(b"QUIT\r\n")
        except Exception as e:  # reported with the row, not fatal
            self.error = repr(e)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(90)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


# ---------------------------------------------------------------- one run


def run_once(mta, sink: Sink, row: Row, e2e_timeout: float) -> dict:
    root = mta.root_pid
    base = sink.count
    cpu0 = tree_cpu(root)
    mem = MemorySampler(root)
    mem.start()
    probe = Probe(mta.port, SIZES[row.size])
    cmd = [
        SMTP_SOURCE,
        "-s",
        str(row.sessions),
        "-m",
        str(row.count),
        "-l",
        str(SIZES[row.size]),
        "-f",
        SENDER,
        "-t",
        RCPT,
        "-M",
        "client.example",
    ]
    if row.per_conn == "many":
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{mta.port}")
    t0 = time.monotonic()
    probe.start()
    src = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    t_acc = time.monotonic() - t0
    probe.stop()
    expected = row.count + probe.sent
    ok = sink.wait_for(base + expected, e2e_timeout)
    t_e2e = time.monotonic() - t0
    cpu = tree_cpu(root) - cpu0
    mem.stop()
    delivered = sink.count - base
    return {
        "mta": mta.name,
        "workers": mta.workers,
        "accepted_per_s": expected / t_acc,  # smtp-source's and the probe's
        "e2e_per_s": delivered / t_e2e,
        "accept_p50_ms": percentile(probe.samples, 0.50) * 1000,
        "accept_p99_ms": percentile(probe.samples, 0.99) * 1000,
        "probe_samples": len(probe.samples),
        "cpu_s_per_1000": cpu / expected * 1000,
        "peak_rss_mb": mem.peak_rss / 2**20,
        "peak_pss_mb": mem.peak_pss / 2**20,
        "accept_wall_s": t_acc,
        "e2e_wall_s": t_e2e,
        "delivered": delivered,
        "expected": expected,
        "complete": ok,
        "smtp_source_rc": src.returncode,
        "smtp_source_stderr": src.stderr.strip()[-500:],
        "probe_error": probe.error,
    }


METRICS = [  # key, column heading, format
    ("accepted_per_s", "accepted msg/s", "{:.0f}"),
    ("e2e_per_s", "end-to-end msg/s", "{:.0f}"),
    ("accept_p50_ms", "accept p50 ms", "{:.1f}"),
    ("accept_p99_ms", "accept p99 ms", "{:.1f}"),
    ("cpu_s_per_1000", "CPU s/1000 msgs", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("peak_pss_mb", "peak PSS MB", "{:.0f}"),
]


def mean_runs(runs: list[dict]) -> dict:
    return {k: statistics.fmean(r[k] for r in runs) for k, _, _ in METRICS}


# ---------------------------------------------------------------- reports


def write_markdown(path: Path, results: list[dict], meta: dict) -> None:
    workers = meta["workers"]
    order = ", ".join([*(f"Tern/{w}w" for w in workers), "Postfix"])
    out = [
        f"# Tern vs Postfix, side by side ({meta['mode']})",
        "",
        f"{meta['when']} on {meta['machine']}; Postfix {meta['postfix_version']}; "
        f"Tern at {meta['tern_commit']}. Loopback; each figure is the mean of two runs "
        f"(order {order}, then again). Tern/Nw: Tern with worker_count = N. Latency: the "
        "Python probe session (MAIL FROM to the reply after DATA) beside smtp-source.",
        "",
        f"## Ratio Tern ({workers[-1]} workers) / Postfix",
        "",
        "| row | msgs | " + " | ".join(h for _, h, _ in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for r in results:
        cells = []
        for k, _, _ in METRICS:
            t, p = r["tern"][k], r["postfix"][k]
            cells.append(f"{t / p:.2f}" if p else "n/a")
        out.append(f"| {r['label']} | {r['count']} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Figures",
        "",
        "| row | MTA | " + " | ".join(h for _, h, _ in METRICS) + " |",
        "|---|---|" + "---:|" * len(METRICS),
    ]
    for r in results:
        for name, m in r["mtas"].items():
            out.append(
                f"| {r['label']} | {name} | "
                + " | ".join(f.format(m[k]) for k, _, f in METRICS)
                + " |"
            )
    if len(workers) > 1:
        lo, hi = workers[0], workers[-1]
        out += [
            "",
            f"## Tern with {lo} vs {hi} workers",
            "",
            "| row | "
            + " | ".join(f"{w}w accepted msg/s | {w}w end-to-end msg/s" for w in workers)
            + f" | accepted {hi}w/{lo}w | end-to-end {hi}w/{lo}w |",
            "|---|" + "---:|" * (2 * len(workers) + 2),
        ]
        for r in results:
            tw = r["tern_workers"]
            cells = [
                f"{tw[str(w)][k]:.0f}" for w in workers for k in ("accepted_per_s", "e2e_per_s")
            ]
            for k in ("accepted_per_s", "e2e_per_s"):
                a, b = tw[str(lo)][k], tw[str(hi)][k]
                cells.append(f"{b / a:.2f}" if a else "n/a")
            out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    problems = [
        f"- {r['label']} {run['mta']}: delivered {run['delivered']}/{run['expected']}, "
        f"smtp-source rc {run['smtp_source_rc']} {run['smtp_source_stderr'][:200]} "
        f"{run['probe_error']}"
        for r in results
        for run in r["runs"]
        if not run["complete"] or run["smtp_source_rc"] or run["probe_error"]
    ]
    if problems:
        out += ["", "## Problems", "", *problems]
    path.write_text("\n".join(out) + "\n")


def write_chart(path: Path, results: list[dict], workers: list[int]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is missing (pip install -e '.[bench]')"
    labels = [r["label"] for r in results]
    ncols = 3 if len(workers) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 0.6 * len(labels) + 3))
    y = range(len(labels))
    ax = axes[0]
    h = 0.2
    for i, (mta, key, colour) in enumerate(
        [
            ("tern", "accepted_per_s", "tab:blue"),
            ("postfix", "accepted_per_s", "tab:orange"),
            ("tern", "e2e_per_s", "lightsteelblue"),
            ("postfix", "e2e_per_s", "navajowhite"),
        ]
    ):
        ax.barh(
            [v + (i - 1.5) * h for v in y],
            [r[mta][key] for r in results],
            h,
            color=colour,
            label=f"{mta if mta == 'postfix' else f'tern {workers[-1]}w'} "
            + ("accepted" if "acc" in key else "end-to-end"),
        )
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("messages/s")
    ax.legend(fontsize=8)
    ax = axes[1]
    keys = [
        ("accepted_per_s", "accepted/s"),
        ("e2e_per_s", "end-to-end/s"),
        ("accept_p99_ms", "p99 latency"),
        ("cpu_s_per_1000", "CPU/1000"),
        ("peak_pss_mb", "peak PSS"),
    ]
    h = 0.8 / len(keys)
    for i, (key, name) in enumerate(keys):
        ratios = [r["tern"][key] / r["postfix"][key] if r["postfix"][key] else 0 for r in results]
        ax.barh([v + (i - len(keys) / 2 + 0.5) * h for v in y], ratios, h, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel(
        f"Tern ({workers[-1]} workers) / Postfix (log scale; 1 = equal)."
        "\nmsgs/s: >1 = Tern faster; latency, CPU, memory: <1 = Tern lower"
    )
    ax.legend(fontsize=8)
    if ncols == 3:
        ax = axes[2]
        bars = [(w, k) for w in workers for k in ("accepted_per_s", "e2e_per_s")]
        h = 0.8 / len(bars)
        for i, (w, key) in enumerate(bars):
            ax.barh(
                [v + (i - len(bars) / 2 + 0.5) * h for v in y],
                [r["tern_workers"][str(w)][key] for r in results],
                h,
                label=f"Tern {w} worker{'s' if w > 1 else ''} "
                + ("accepted" if "acc" in key else "end-to-end"),
            )
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        ax.set_xlabel("messages/s, Tern by worker_count")
        ax.legend(fontsize=8)
    fig.suptitle("Tern vs Postfix on loopback, smtp-source load, smtp-sink next hop")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def postfix_version() -> str:
    r = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True, text=True)
    return r.stdout.strip()


def git_commit() -> str:
    """HEAD, and "+changes" when engine/ differs from it (the server runs the working tree)."""
    r = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "engine"], cwd=REPO, capture_output=True, text=True
    )
    return r.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small subset, a few minutes")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--workers",
        default="1,2",
        help="Tern's worker_count values to measure, comma-separated (default 1,2); one Tern "
        "server each, alternated with Postfix; the last is the one in the Tern/Postfix ratios",
    )
    ap.add_argument(
        "--e2e-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the sink to have every message of a run",
    )
    args = ap.parse_args()
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error("--workers: comma-separated integers, e.g. 1,2")
    if not workers or any(w < 1 for w in workers) or len(set(workers)) != len(workers):
        ap.error("--workers: distinct integers >= 1, e.g. 1,2")

    if os.geteuid() != 0:
        print(
            "run as root: the throwaway Postfix instance's master must start as root",
            file=sys.stderr,
        )
        return 2
    ensure_installed()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    rows = matrix(args.quick)
    tern_commit = git_commit()  # what the server is started from, not what HEAD is at the end
    started: list = []
    results: list[dict] = []
    try:
        pairs = []
        for w in workers:  # one Tern server (and sink) per worker_count, all up throughout
            tern_sink = Sink()
            started.append(tern_sink)
            tern = Tern(tern_sink.port, w)
            started.append(tern)
            pairs.append((tern, tern_sink))
        pf_sink = Sink()
        started.append(pf_sink)
        postfix = Postfix(pf_sink.port)
        started.append(postfix)
        pairs.append((postfix, pf_sink))
        # warm-up: one small message through each, so start-up costs stay out of row 1
        for mta, sink in pairs:
            run_once(mta, sink, Row("1KB", 1, "one", 20), args.e2e_timeout)
        for i, row in enumerate(rows, 1):
            runs = []
            for _rep in range(2):
                for mta, sink in pairs:
                    run = run_once(mta, sink, row, args.e2e_timeout)
                    runs.append(run)
                    print(
                        f"[{i}/{len(rows)}] {row.label:24} {mta.name:8} "
                        f"acc {run['accepted_per_s']:7.0f}/s  e2e {run['e2e_per_s']:7.0f}/s"
                        f"  p50 {run['accept_p50_ms']:6.1f}ms p99 {run['accept_p99_ms']:7.1f}ms"
                        f"  cpu {run['cpu_s_per_1000']:6.2f}s/1k"
                        f"  pss {run['peak_pss_mb']:5.0f}MB"
                        + ("" if run["complete"] else "  INCOMPLETE"),
                        flush=True,
                    )
                    time.sleep(0.5)
            mtas = {m.name: mean_runs([r for r in runs if r["mta"] == m.name]) for m, _ in pairs}
            results.append(
                {
                    "label": row.label,
                    **asdict(row),
                    "runs": runs,
                    "tern": mtas[f"tern/{workers[-1]}w"],  # the one in the Tern/Postfix ratios
                    "postfix": mtas["postfix"],
                    "tern_workers": {str(w): mtas[f"tern/{w}w"] for w in workers},
                    "mtas": mtas,
                }
            )
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
    finally:
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception as e:  # keep cleaning up the rest
                print(f"cleanup of {type(thing).__name__}: {e}", file=sys.stderr)
    if not results:
        return 1
    meta = {
        "mode": "quick" if args.quick else "full",
        "when": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs {platform.machine()} "
        f"{platform.release()}",
        "postfix_version": postfix_version(),
        "tern_commit": tern_commit,
        "workers": workers,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sidebyside.json").write_text(
        json.dumps({"meta": meta, "rows": results}, indent=2) + "\n"
    )
    write_markdown(args.out / "sidebyside.md", results, meta)
    print(f"wrote {args.out / 'sidebyside.md'} and {args.out / 'sidebyside.json'}")
    print(write_chart(args.out / "sidebyside.png", results, workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
