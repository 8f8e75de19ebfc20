"""Runs ``tern serve`` as a real process for end-to-end tests, on a loopback port.

    def test_x(tern):
        server = tern(relayhost=sink.nexthop)     # extra TOML keys as keyword arguments
        with smtplib.SMTP(*server.address) as client: ...
        server.wait_log("status=sent")
        server.stop(); server.start()             # restart on the same spool and port
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import free_port

REPO = Path(__file__).resolve().parent.parent


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class TernServer:
    def __init__(self, directory: Path, settings: dict, transport_maps: dict | None = None):
        self.directory = directory
        self.port = free_port()
        self.address = ("127.0.0.1", self.port)
        self.maillog = directory / "maillog"
        self.config_file = directory / "tern.toml"
        base = {
            "myhostname": "mx.tern.test",
            "queue_directory": str(directory / "spool"),
            "maillog_file": str(self.maillog),
        }
        base.update(settings)
        lines = [f"{key} = {toml_value(value)}" for key, value in base.items()]
        if transport_maps:
            lines.append("[transport_maps]")
            lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in transport_maps.items()]
        lines += ["[[listen]]", f'address = "127.0.0.1:{self.port}"', 'service = "smtp"']
        self.config_file.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    def tern(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run another ``tern`` command against this server's configuration."""
        return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=30)

    def start(self) -> TernServer:
        with open(self.directory / "stderr", "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", "--config", str(self.config_file)],
                cwd=REPO, stdout=stderr, stderr=stderr)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tern exited: {(self.directory / 'stderr').read_text()}")
            try:
                with socket.create_connection(self.address, timeout=0.5) as probe:
                    probe.recv(100)
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("tern did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return process.returncode if process else 0
        process.send_signal(sig)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{count}x {text!r} not in maillog:\n{self.log()}")


@pytest.fixture
def tern(tmp_path) -> Iterator:
    """Factory: ``tern(**toml_keys, transport_maps={...}, start=True)`` → a running TernServer."""
    servers: list[TernServer] = []

    def make(*, transport_maps: dict | None = None, start: bool = True, **settings):
        directory = tmp_path / f"tern{len(servers)}"
        directory.mkdir()
        server = TernServer(directory, settings, transport_maps)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()
        if os.environ.get("TERN_TEST_SHOW_LOGS"):
            print(server.log())
