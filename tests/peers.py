"""Real peers on loopback for end-to-end tests: an unbound DNS server, Postfix's smtp-sink and
HAProxy (a TCP proxy sending the PROXY protocol header).

Both fixtures are factories (start as many peers as a test needs); every process is stopped by
its PID at teardown. Everything binds 127.0.0.1 on a free port, so tests can run in parallel.

    def test_mx(dns_server):
        host, port = dns_server(["mx.test. 60 IN MX 10 mail.mx.test.",
                                 "mail.mx.test. 60 IN A 127.0.0.1"])
        config = Config(dns_servers=(f"{host}:{port}",), dns_timeout=2.0)

    def test_relay(smtp_sink):
        sink = smtp_sink()                  # extra smtp-sink flags: smtp_sink("-r", "RCPT")
        config = Config(relayhost=sink.nexthop)   # "[127.0.0.1]:PORT"
        ...                                 # deliver
        (message,) = sink.messages()        # SinkMessage(sender, recipients, content, ...)
        sink.stop(); ...; sink.start()      # next hop down, then up again on the same port

Import them in a test module with ``from peers import free_port`` (conftest.py re-exports the
fixtures, so they need no import).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

UNBOUND = "/usr/sbin/unbound"
SMTP_SINK = "/usr/sbin/smtp-sink"
HAPROXY = "/usr/sbin/haproxy"
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for a peer to start answering


def free_port(*, udp: bool = False, host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on now (also free for UDP with ``udp``)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            if not udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
                try:
                    datagram.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def _stop_process(proc: subprocess.Popen) -> None:
    """Terminate one process we started, by its PID; kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if ready():
            return
        time.sleep(0.02)
    _stop_process(proc)
    raise RuntimeError(f"{what} did not start in {START_TIMEOUT}s: {log.read_text()[-2000:]}")


# ---- DNS: unbound serving static local zones ----


def _unbound_config(port: int, directory: Path, records: Sequence[str], zones: Sequence[str],
                    *, module_config: str = "iterator", extra: Sequence[str] = ()):
    lines = [
        "server:",
        f"  interface: {LOOPBACK}@{port}",
        f"  port: {port}",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  use-syslog: no",
        '  logfile: ""',
        "  do-not-query-localhost: no",
        "  access-control: 127.0.0.0/8 allow",
        "  num-threads: 1",
        f'  module-config: "{module_config}"',
        *extra,
    ]
    lines += [f'  local-zone: "{zone}" static' for zone in zones]
    for record in records:  # a record holding double quotes (TXT) goes in single quotes
        lines.append(f"  local-data: '{record}'" if '"' in record else f'  local-data: "{record}"')
    lines += ["remote-control:", "  control-enable: no", ""]
    return "\n".join(lines)


def _dns_answers(port: int, name: str = "test.") -> bool:
    try:
        dns.query.udp(dns.message.make_query(name, "SOA"), LOOPBACK, timeout=0.2, port=port)
    except (OSError, dns.exception.DNSException):
        return False
    return True


@pytest.fixture
def dns_server(tmp_path_factory) -> Iterator[Callable[..., tuple[str, int]]]:
    """Factory: ``dns_server(records, zones=("test.",)) -> (host, port)`` starts ``unbound -d``
    answering for each zone (``local-zone: ZONE static``) from ``records``, zone-file lines such
    as "mx.test. 60 IN MX 10 mail1.mx.test.", "nullmx.test. 60 IN MX 0 ." or
    "aonly.test. 60 IN A 127.0.0.1". A name in a zone without records is NXDOMAIN."""
    if not os.access(UNBOUND, os.X_OK):
        pytest.skip(f"{UNBOUND} not installed")
    procs: list[subprocess.Popen] = []

    def start(records: Sequence[str], *, zones: Sequence[str] = ("test.",)) -> tuple[str, int]:
        directory = tmp_path_factory.mktemp("unbound")
        port = free_port(udp=True)
        conf = directory / "unbound.conf"
        conf.write_text(_unbound_config(port, directory, records, zones))
        log = directory / "unbound.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [UNBOUND, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        procs.append(proc)
        _wait_until(lambda: _dns_answers(port), proc, "unbound", log)
        return LOOPBACK, port

    yield start
    for proc in procs:
        _stop_process(proc)


# ---- DNSSEC: a zone signed with ldns-signzone, served by nsd, validated by unbound ----

NSD = "/usr/sbin/nsd"
LDNS_KEYGEN = "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = "/usr/bin/ldns-signzone"


def _zone_lines(zone: str, records: Sequence[str]) -> list[str]:
    return [f"{zone} 60 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 60",
            f"{zone} 60 IN NS ns.{zone}", f"ns.{zone} 60 IN A {LOOPBACK}", *records]


def _signed_zone(directory: Path, zone: str, records: Sequence[str], *,
                 expired: bool = False) -> tuple[str, str]:
    """Writes ZONE.zone.signed (a KSK and a ZSK, ECDSA P-256, NSEC3) in ``directory`` and
    returns the KSK's DNSKEY line (the trust anchor) and its DS line (for the parent).
    ``records`` are zone-file lines with absolute names; the SOA and NS are added. With
    ``expired`` the signatures ended in 2020 (a validator finds the zone bogus)."""
    name = zone.rstrip(".")
    keys = []
    for flags in (["-k"], []):
        keys.append(subprocess.run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", *flags, name],
                                   cwd=directory, check=True, capture_output=True,
                                   text=True).stdout.strip())
    anchor = (directory / f"{keys[0]}.key").read_text().strip()
    ds = (directory / f"{keys[0]}.ds").read_text().strip()
    zone_file = directory / f"{name}.zone"
    zone_file.write_text("\n".join(_zone_lines(zone, records)) + "\n" + anchor + "\n"
                         + (directory / f"{keys[1]}.key").read_text())
    dates = ["-i", "20200101", "-e", "20200201"] if expired else []
    subprocess.run([LDNS_SIGNZONE, "-n", *dates, str(zone_file), *keys], cwd=directory,
                   check=True, capture_output=True)
    return anchor, ds


def _nsd_config(port: int, directory: Path, zones: Sequence[str]) -> str:
    lines = [
        "server:", f"  ip-address: {LOOPBACK}@{port}", f"  port: {port}",
        f'  zonesdir: "{directory}"', '  database: ""', '  username: ""', '  chroot: ""',
        f'  pidfile: "{directory}/nsd.pid"', f'  logfile: "{directory}/nsd.log"',
        f'  xfrdfile: "{directory}/xfrd.state"', f'  zonelistfile: "{directory}/zone.list"',
        f'  xfrdir: "{directory}"', "  server-count: 1", "  verbosity: 1",
        "remote-control:", "  control-enable: no"]
    for zone in zones:
        lines += ["zone:", f"  name: {zone.rstrip('.')}", f'  zonefile: "{zone}zone.signed"']
    return "\n".join(lines) + "\n"


@pytest.fixture
def dnssec_server(tmp_path_factory) -> Iterator[Callable[..., tuple[str, int]]]:
    """Factory: ``dnssec_server(records, zone="dane.test.", signed=True, insecure={},
    bogus={}) -> (host, port)`` of a validating unbound (``module-config: "validator
    iterator"``) whose only trust anchor is the KSK of ``zone``, a zone signed at start with
    ldns-signzone and served by nsd on loopback (a stub zone). Its answers for the zone carry
    the AD bit. ``signed=False`` configures no trust anchor: the same answers come back
    without AD.

    Child zones, delegated from ``zone`` and served by the same nsd, each a mapping
    ``{"child.dane.test.": [records]}``: ``insecure`` ones are unsigned, with no DS in the
    parent (provably insecure: answers without AD, as for any unsigned domain on the
    Internet); ``bogus`` ones are signed with a DS in the parent but with expired
    signatures (the validator answers SERVFAIL)."""
    for tool in (UNBOUND, NSD, LDNS_KEYGEN, LDNS_SIGNZONE):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} not installed")
    procs: list[subprocess.Popen] = []

    def start(records: Sequence[str], *, zone: str = "dane.test.", signed: bool = True,
              insecure: dict[str, Sequence[str]] | None = None,
              bogus: dict[str, Sequence[str]] | None = None) -> tuple[str, int]:
        directory = tmp_path_factory.mktemp("dnssec")
        records = list(records)
        children = [*(insecure or {}), *(bogus or {})]
        for child, child_records in (insecure or {}).items():
            records.append(f"{child} 60 IN NS ns.{zone}")
            (directory / f"{child}zone.signed").write_text(
                "\n".join(_zone_lines(child, child_records)).replace(
                    f"{child} 60 IN NS ns.{child}", f"{child} 60 IN NS ns.{zone}") + "\n")
        for child, child_records in (bogus or {}).items():
            records.append(f"{child} 60 IN NS ns.{zone}")
            _, ds = _signed_zone(directory, child, child_records, expired=True)
            records.append(ds)
        anchor, _ = _signed_zone(directory, zone, records)
        nsd_port = free_port(udp=True)
        nsd_conf = directory / "nsd.conf"
        nsd_conf.write_text(_nsd_config(nsd_port, directory, [zone, *children]))
        nsd_log = directory / "nsd.out"
        with nsd_log.open("wb") as out:
            procs.append(subprocess.Popen([NSD, "-d", "-c", str(nsd_conf)], stdout=out,
                                          stderr=subprocess.STDOUT))
        _wait_until(lambda: _dns_answers(nsd_port, zone), procs[-1], "nsd", nsd_log)
        port = free_port(udp=True)
        extra = [f'  local-zone: "{zone}" nodefault', f'  domain-insecure: "{zone}"']
        if signed:
            (directory / "anchor.key").write_text(anchor + "\n")
            extra = [f'  local-zone: "{zone}" nodefault',
                     f'  trust-anchor-file: "{directory}/anchor.key"']
        extra += ['  local-zone: "test." nodefault']
        for name in (zone, *children):
            extra += ["stub-zone:", f'  name: "{name}"', f"  stub-addr: {LOOPBACK}@{nsd_port}"]
        conf = directory / "unbound.conf"
        conf.write_text(_unbound_config(port, directory, [], [],
                                        module_config="validator iterator", extra=extra))
        log = directory / "unbound.log"
        with log.open("wb") as out:
            procs.append(subprocess.Popen([UNBOUND, "-d", "-c", str(conf)], stdout=out,
                                          stderr=subprocess.STDOUT))
        _wait_until(lambda: _dns_answers(port, zone), procs[-1], "unbound", log)
        return LOOPBACK, port

    yield start
    for proc in reversed(procs):
        _stop_process(proc)


# ---- SMTP: Postfix's smtp-sink, capturing each transaction to a file ----


@dataclass(frozen=True)
class SinkMessage:
    """One transaction as smtp-sink dumped it. ``content`` has CRLF line ends and is unstuffed;
    smtp-sink stores lines with LF, so a bare LF or CR in the original is not told apart."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes
    helo: str
    mail_args: str  # the whole MAIL FROM argument, e.g. "<a@x.test> SIZE=120 BODY=8BITMIME"
    rcpt_args: tuple[str, ...]
    client_addr: str
    path: Path


def _path_address(args: str) -> str:
    """The address inside "<...>" at the start of a MAIL/RCPT argument."""
    start = args.find("<")
    end = args.find(">", start + 1)
    return args[start + 1 : end] if start >= 0 and end > start else args.split(" ")[0]


def parse_sink_dump(path: Path) -> SinkMessage:
    """Read one ``-d`` dump file (smtp-sink(1) DUMP FILE FORMAT): X-Client-Addr, X-Client-Proto,
    X-Helo-Args, X-Mail-Args, X-Rcpt-Args… records, a three-line Received: header, the message,
    and one empty line."""
    lines = path.read_bytes().split(b"\n")
    fields: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith(b"Received:"):
        name, _, value = lines[i].decode("utf-8", "replace").partition(":")
        fields.setdefault(name, []).append(value.strip())
        i += 1
    body = b"\n".join(lines[i + 3 :])  # after the Received: header and its two continuations
    body = body.removesuffix(b"\n")  # the empty line smtp-sink appends
    mail_args = fields.get("X-Mail-Args", [""])[0]
    rcpt_args = tuple(fields.get("X-Rcpt-Args", []))
    return SinkMessage(
        sender=_path_address(mail_args),
        recipients=tuple(_path_address(arg) for arg in rcpt_args),
        content=body.replace(b"\n", b"\r\n"),
        helo=fields.get("X-Helo-Args", [""])[0],
        mail_args=mail_args,
        rcpt_args=rcpt_args,
        client_addr=fields.get("X-Client-Addr", [""])[0],
        path=path,
    )


def _tcp_listening(host: str, port: int) -> bool:
    """Whether something listens on host:port (IPv4), from /proc (no probe connection, which
    smtp-sink would count as a session)."""
    want = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        with socket.socket() as probe:
            return probe.connect_ex((host, port)) == 0
    return any(
        parts[1] == want and parts[3] == "0A"  # 0A = LISTEN
        for parts in (line.split() for line in table.splitlines()[1:])
    )


class SmtpSink:
    """One smtp-sink on ``host``:``port`` (default 127.0.0.1 and a free port); ``flags`` are
    extra smtp-sink(1) options, e.g. ("-r", "RCPT") to soft-reject every RCPT, ("-f", "DATA") to
    hard-reject DATA, ("-f", "CONNECT") to refuse the greeting, ("-p",) to not offer PIPELINING,
    ("-8",) to not offer 8BITMIME, ("-w", "5") to wait 5 s before answering DATA."""

    def __init__(
        self,
        flags: Sequence[str] = (),
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        hostname: str = "smtp-sink",
    ) -> None:
        self.host = host
        self.port = port or free_port(host=host)
        self.flags = tuple(flags)
        self.hostname = hostname
        # smtp-sink drops to "nobody" when started as root: the dump directory must be
        # reachable and writable by it, so it lives in /tmp rather than under pytest's 0700 tree.
        self.dump_dir = Path(tempfile.mkdtemp(prefix="tern-sink-"))
        self.dump_dir.chmod(0o777)
        self.log = self.dump_dir.parent / f"{self.dump_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def nexthop(self) -> str:
        """The Postfix next-hop form for relayhost / transport_maps: "[127.0.0.1]:PORT"."""
        return f"[{self.host}]:{self.port}"

    def start(self) -> SmtpSink:
        """Start (again) on the same port; returns when it listens."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        command = [
            SMTP_SINK,
            *user,
            "-h",
            self.hostname,
            "-d",
            f"{self.dump_dir}/%Y%m%d%H%M%S.",
            *self.flags,
            f"inet:{self.host}:{self.port}",
            "128",
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _wait_until(lambda: _tcp_listening(self.host, self.port), self.proc, "smtp-sink", self.log)
        return self

    def stop(self) -> None:
        """Stop it (connections to the port are then refused)."""
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None

    def _open_files(self) -> set[str] | None:
        """The files smtp-sink holds open (transactions in progress), None when unknown."""
        if self.proc is None:
            return set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            return None if self.proc.poll() is None else set()
        names = set()
        for fd in fds:
            with contextlib.suppress(OSError):
                names.add(os.readlink(fd))
        return names

    def messages(self) -> list[SinkMessage]:
        """Every finished transaction so far, oldest first. smtp-sink creates a dump file at
        MAIL FROM and writes it at "." (it drops it if the transaction fails), so a file it
        still holds open, or an empty one, is a transaction in progress and is left out."""
        paths = list(self.dump_dir.iterdir())  # list first, then see which are still open
        busy = self._open_files() or set()
        found = []
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if stat.st_size and str(path) not in busy:
                found.append((stat.st_mtime_ns, path.name, path))
        messages = []
        for *_, path in sorted(found):
            with contextlib.suppress(FileNotFoundError):
                messages.append(parse_sink_dump(path))
        return messages

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[SinkMessage]:
        """The messages once at least ``count`` arrived (for deliveries done in the background)."""
        deadline = time.monotonic() + timeout
        while len(found := self.messages()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return found

    def clear(self) -> None:
        """Forget the messages received so far."""
        for path in self.dump_dir.iterdir():
            path.unlink()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)


@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    """Factory: ``smtp_sink(*flags, host="127.0.0.1", port=None, hostname="smtp-sink",
    start=True) -> SmtpSink`` runs Postfix's smtp-sink on ``host`` and ``port`` (default: a free
    one). Two sinks may share a port on different loopback addresses (127.0.0.2 …), as the MX
    hosts of one domain do. See SmtpSink for the flags."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip(f"{SMTP_SINK} not installed")
    sinks: list[SmtpSink] = []

    def make(
        *flags: str,
        host: str = LOOPBACK,
        port: int | None = None,
        hostname: str = "smtp-sink",
        start: bool = True,
    ) -> SmtpSink:
        sink = SmtpSink(flags, host=host, port=port, hostname=hostname)
        sinks.append(sink)
        return sink.start() if start else sink

    yield make
    for sink in sinks:
        sink.close()


# ---- HAProxy: TCP frontends on loopback, each relaying to one server with a PROXY header ----


@dataclass(frozen=True)
class ProxyRoute:
    """One HAProxy frontend: clients connect to ``host``:``port``; HAProxy connects to
    ``server`` from ``source`` and sends ``send_proxy`` ("send-proxy" = v1, "send-proxy-v2")."""

    port: int
    server: tuple[str, int]
    source: str
    send_proxy: str
    host: str = LOOPBACK


def _haproxy_config(routes: Sequence[ProxyRoute]) -> str:
    lines = [
        "global",
        "  maxconn 100",
        "defaults",
        "  mode tcp",
        "  timeout connect 5s",
        "  timeout client 30s",
        "  timeout server 30s",
    ]
    for index, route in enumerate(routes):
        lines += [
            f"frontend in{index}",
            f"  bind {route.host}:{route.port}",
            f"  default_backend out{index}",
            f"backend out{index}",
            f"  server s{index} {route.server[0]}:{route.server[1]} {route.send_proxy} "
            f"source {route.source}",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def haproxy(tmp_path_factory) -> Iterator[Callable[..., list[ProxyRoute]]]:
    """Factory: ``haproxy([(server, source, send_proxy), ...]) -> [ProxyRoute, ...]`` runs Debian's
    haproxy in the foreground (``-db``, never the system service) with one frontend on a free
    127.0.0.1 port per route; stopped by its PID at teardown."""
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip(f"{HAPROXY} not installed")
    procs: list[subprocess.Popen] = []

    def start(specs: Sequence[tuple[tuple[str, int], str, str]]) -> list[ProxyRoute]:
        directory = tmp_path_factory.mktemp("haproxy")
        routes = [ProxyRoute(free_port(), server, source, send_proxy)
                  for server, source, send_proxy in specs]
        conf = directory / "haproxy.cfg"
        conf.write_text(_haproxy_config(routes))
        log = directory / "haproxy.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)], stdout=out,
                                    stderr=subprocess.STDOUT)
        procs.append(proc)
        _wait_until(lambda: all(_tcp_listening(r.host, r.port) for r in routes), proc,
                    "haproxy", log)
        return routes

    yield start
    for proc in procs:
        _stop_process(proc)
