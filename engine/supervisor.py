"""``tern serve`` with several workers: the supervisor (Postfix's master) and its workers.

The supervisor binds every ``[[listen]]`` socket (a bind error is still one fatal line), then
forks one worker per spool shard: worker i runs engine.serve.serve on ``shard{i}`` (queue IDs
ending in the shard's letter) with its own control socket ``control{i}``, accepting on the
inherited listening sockets, so the kernel hands each connection to one of them. A worker that
exits unexpectedly is logged in Postfix's words ("warning: process … pid N exit status S",
"… killed by signal N") and restarted on the same shard after a short backoff (doubled while it
keeps dying young); the new worker reads the shard's queue back. SIGTERM/SIGINT: SIGTERM to every
worker, wait for their graceful shutdown, exit 0. A worker is killed with its supervisor
(PR_SET_PDEATHSIG), so a killed server leaves no orphan holding its port or shards. All
processes append to the same maillog; the pid in each line tells them apart. Trusts the
validated Config.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from engine.config import Config, Listener
from engine.control import worker_socket
from engine.log import Maillog
from engine.serve import StartupError, serve, shard_path, started_line

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
RESTART_BACKOFF = 0.1  # seconds before restarting a dead worker; doubled while it dies young
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # seconds a worker must have lived for its death to reset the backoff
STARTUP_TIMEOUT = 60.0  # seconds the first workers get to open their shards
STOP_TIMEOUT = 60.0  # seconds workers get for their graceful shutdown before SIGKILL
PR_SET_PDEATHSIG = 1


# -- the listening sockets -------------------------------------------------------------------


def bind_listeners(config: Config) -> list[tuple[Listener, socket.socket]]:
    """Listening sockets for every ``[[listen]]`` table, on every address of its host (as
    loop.create_server binds them), each with its listener (whose service it runs). Raises
    StartupError naming the one that cannot be bound."""
    sockets: list[tuple[Listener, socket.socket]] = []
    try:
        for listener in config.listen:
            sockets += [(listener, sock) for sock in _bind(listener.host, listener.port)]
    except BaseException:
        for _, sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(host: str, port: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        reason = os.strerror(error.errno) if error.errno else str(error)
        if isinstance(error, socket.gaierror):
            reason = error.strerror or str(error)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from error
    return sockets


# -- a worker process ------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Be killed when the supervisor dies (even by SIGKILL): no orphan keeps the port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # died before the prctl
        os._exit(1)


def _report(fd: int | None, text: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, text.encode(errors="replace") + b"\n")
        os.close(fd)


def worker_main(config: Config, shard: int, sockets: list[tuple[Listener, socket.socket]],
                report_fd: int | None) -> int:
    """The worker's whole life: serve shard ``shard`` until SIGTERM. Says "ready" (or
    "fatal: …") on ``report_fd`` once it is serving (or could not start)."""
    import uvloop

    async def main() -> None:
        ready = asyncio.Event()

        async def report() -> None:
            await ready.wait()
            _report(report_fd, "ready")

        reporter = asyncio.create_task(report())
        try:
            await serve(config, ready=ready, shard=shard, sockets=sockets,
                        control_name=worker_socket(shard))
        finally:
            reporter.cancel()

    try:
        uvloop.run(main())
    except StartupError as error:
        if report_fd is None:
            print(f"tern: fatal: {error}", file=sys.stderr)
        _report(report_fd, f"fatal: {error}")
        return 1
    return 0


# -- the supervisor --------------------------------------------------------------------------


@dataclass
class Worker:
    shard: int
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None  # when to start it again (it died)


class Supervisor:
    """Runs ``count`` workers on shards 0…count-1 until SIGTERM/SIGINT."""

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.workers = [Worker(shard) for shard in range(count)]
        self._sockets: list[tuple[Listener, socket.socket]] = []
        self._pid = os.getpid()
        self.maillog: Maillog | None = None

    def run(self) -> None:
        """Start, supervise, stop. Raises StartupError (one line for the operator) when the
        maillog, the spool, a listener or a first worker cannot start."""
        config = self.config
        try:
            self.maillog = Maillog(config.myhostname, config.maillog_file)
        except OSError as error:
            raise StartupError(f"maillog_file {config.maillog_file}: {error.strerror}") from error
        try:
            for worker in self.workers:
                try:
                    shard_path(config, worker.shard).mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise StartupError(f"queue_directory {config.queue_directory}: cannot open "
                                       f"the spool: {error.strerror or error}") from error
            self._sockets = bind_listeners(config)
            # signals wait in the mask until sigtimedwait takes them: none lost, no handler
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            self._start_all()
            self.maillog.line("master", started_line(config, len(self.workers)))
            self._supervise()
            self.maillog.line("master", "terminating on signal")
            self._stop_all()
        finally:
            for _, sock in self._sockets:
                sock.close()
            self.maillog.close()
            # the mask stays: a second signal must not kill the supervisor on its way out

    def _fork(self, worker: Worker, report_fd: int | None = None) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                _die_with_parent(self._pid)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
                status = worker_main(self.config, worker.shard, self._sockets, report_fd)
            except BaseException:  # noqa: BLE001 - a worker never returns into the supervisor
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        worker.pid = pid
        worker.started = time.monotonic()
        worker.restart_at = None

    def _start_all(self) -> None:
        """Fork every worker and wait until each serves; if one cannot, stop the others and
        raise its StartupError."""
        pending: dict[int, tuple[Worker, bytes]] = {}
        for worker in self.workers:
            read_fd, write_fd = os.pipe()
            try:
                self._fork(worker, write_fd)
            finally:
                os.close(write_fd)
            pending[read_fd] = (worker, b"")
        failure = ""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while pending and not failure:
            left = deadline - time.monotonic()
            readable = select.select(list(pending), [], [], max(0.0, left))[0]
            if not readable:
                failure = "workers did not start in time"
                break
            for fd in readable:
                worker, data = pending[fd]
                chunk = os.read(fd, 4096)
                data += chunk
                if chunk and b"\n" not in data:
                    pending[fd] = (worker, data)
                    continue
                del pending[fd]
                os.close(fd)
                line = data.decode(errors="replace").strip()
                if line != "ready":
                    failure = (line.removeprefix("fatal: ")
                               or f"worker {worker.shard} exited while starting")
                    break
        for fd in pending:
            os.close(fd)
        if failure:
            self._stop_all(quiet=True)
            raise StartupError(failure)

    def _supervise(self) -> None:
        """Until SIGTERM/SIGINT: reap dead workers and start them again after their backoff."""
        while True:
            now = time.monotonic()
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else 1.0
            info = signal.sigtimedwait(SIGNALS, max(timeout, 0.001))
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return
            self._reap(restart=True)
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._fork(worker)

    def _reap(self, *, restart: bool) -> None:
        by_pid = {worker.pid: worker for worker in self.workers if worker.pid}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = by_pid.get(pid)
            if worker is None:
                continue
            worker.pid = 0
            if restart or status != 0:
                self._log_exit(worker, pid, status)
            if restart:
                lived = time.monotonic() - worker.started
                worker.failures = 1 if lived >= STABLE_AFTER else worker.failures + 1
                backoff = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (worker.failures - 1))
                worker.restart_at = time.monotonic() + backoff

    def _log_exit(self, worker: Worker, pid: int, status: int) -> None:
        process = f"process tern/worker{worker.shard} pid {pid}"
        if os.WIFSIGNALED(status):
            text = f"{process} killed by signal {os.WTERMSIG(status)}"
        else:
            text = f"{process} exit status {os.waitstatus_to_exitcode(status)}"
        if self.maillog is not None:
            self.maillog.line("master", f"warning: {text}")

    def _stop_all(self, *, quiet: bool = False) -> None:
        """SIGTERM to every worker, then wait for each to finish its graceful shutdown (SIGKILL
        past STOP_TIMEOUT)."""
        for worker in self.workers:
            worker.restart_at = None
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(worker.pid for worker in self.workers):
            if time.monotonic() >= deadline:
                for worker in self.workers:
                    if worker.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.pid, signal.SIGKILL)
                deadline = float("inf")
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            if quiet:
                self._reap_quietly()
            else:
                self._reap(restart=False)

    def _reap_quietly(self) -> None:
        for worker in self.workers:
            if worker.pid:
                try:
                    pid, _ = os.waitpid(worker.pid, os.WNOHANG)
                except ChildProcessError:
                    pid = worker.pid
                if pid:
                    worker.pid = 0
