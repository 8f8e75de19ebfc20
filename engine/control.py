"""The control channel of a running ``tern serve``: queue operations from ``tern queue …``.

A unix-domain socket ``<queue_directory>/control`` (mode 0600, so only the server's own user, or
root, may connect) speaks one JSON request per line and answers one JSON reply per line. A
server of several workers has one per worker, ``control0``, ``control1``…, each answering for its
own spool shard (``shard0``, ``shard1``…): a message lives in exactly one.

    {"op": "hold", "ids": ["QID", ...] | null}       → {"ok": true, "ids": [affected QIDs]}
    {"op": "delete", "ids": null, "deferred_only": true}
    {"op": "flush", "domain": "example.net" | null}   → {"ok": false, "error": "..."} on failure
    {"op": "active"}                                 → {"ok": true, "ids": [active QIDs]}
    {"op": "tls-report", "day": "YYYY-MM-DD"}        → {"ok": true, "ids": [reports sent]}

``null`` ids means ALL. Ops are hold, release, delete, requeue and flush, each one call of the
same QueueManager method the offline tools use, run one at a time; and active, the IDs in the
queue manager's active queue (being delivered now), read without waiting for them. Trusts the
peer's user (the socket's mode), not its requests: each is checked before anything is done, and
one that cannot be read (not JSON, nested too deep, wrong types) is answered with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SOCKET_NAME = "control"
SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL (Linux)
REQUEST_LIMIT = 1 << 20  # bytes in one request line
REPLY_LIMIT = 1 << 28  # bytes in one reply line (every ID of a big queue)
CLOSE_GRACE = 10.0  # seconds an operation in progress gets to finish at shutdown
CHANGES = frozenset({"hold", "release", "delete", "requeue", "flush",
                     "tls-report"})  # one at a time
OPS = CHANGES | {"active"}


class ControlError(Exception):
    """The control channel cannot be set up, or the server refused a request."""


class ControlUnavailable(ControlError):
    """No server answers on the control socket (none runs on this queue directory)."""


# -- the socket's address: long queue directories go through the directory's descriptor --------


class _SocketAddress:
    """Where to bind or connect: the plain path when it fits in sun_path, else the same file
    reached through an open descriptor of the queue directory (``/proc/self/fd/N/control``)."""

    def __init__(self, directory: Path, name: str = SOCKET_NAME) -> None:
        self.path = directory / name
        self._dir_fd: int | None = None
        self.address = str(self.path)
        if len(os.fsencode(self.address)) > SUN_PATH_MAX:
            if not Path("/proc/self/fd").is_dir():
                raise ControlError(
                    f"control socket {self.path}: path longer than {SUN_PATH_MAX} bytes; "
                    f"choose a shorter queue_directory")
            self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
            self.address = f"/proc/self/fd/{self._dir_fd}/{name}"

    def chmod(self, mode: int) -> None:
        os.chmod(self.address, mode)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


# -- server ----------------------------------------------------------------------------------


def _ids(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError('"ids" must be a list of queue IDs or null (ALL)')


class ControlServer:
    """Answers control requests with a QueueManager's hold/release/delete/requeue/flush, and
    the IDs in its active queue."""

    def __init__(self, qmgr, address: _SocketAddress, maillog=None) -> None:
        self.qmgr = qmgr
        self.maillog = maillog
        self._address = address
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._one_at_a_time = asyncio.Lock()
        # "tls-report": sends one day's TLS-RPT reports (set by engine.serve when enabled)
        self.tls_report: Callable[[str], Awaitable[list[str]]] | None = None

    @classmethod
    async def start(cls, queue_directory: Path, qmgr, maillog=None, *,
                    name: str = SOCKET_NAME) -> ControlServer:
        """Bind ``<queue_directory>/<name>`` (0600) and serve. Raises ControlError when another
        server answers there or the socket cannot be made."""
        address = _SocketAddress(Path(queue_directory), name)
        try:
            sock = _bind(address)
        except BaseException:
            address.close()
            raise
        control = cls(qmgr, address, maillog)
        control._server = await asyncio.start_unix_server(control._serve, sock=sock,
                                                          limit=REQUEST_LIMIT)
        return control

    @property
    def path(self) -> Path:
        return self._address.path

    async def close(self) -> None:
        """Stop accepting, let an operation in progress finish, drop idle clients, remove the
        socket file."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        self._address.unlink()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                await self._one_at_a_time.acquire()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self._address.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while line := await reader.readline():
                reply = await self.answer(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ValueError, ConnectionError):
            pass  # a request line over the limit, or the client went away
        finally:
            self._connections.discard(task)
            writer.close()

    async def answer(self, line: bytes) -> dict:
        """One request line → its reply."""
        try:
            op, operation = self._parse(line)
        except Exception as error:  # noqa: BLE001 - ValueError, RecursionError (deep nesting)…
            return {"ok": False, "error": f"bad request: {error}"}
        try:
            if op not in CHANGES:  # a read: nothing to wait for
                return {"ok": True, "ids": list(await operation())}
            async with self._one_at_a_time:
                return {"ok": True, "ids": list(await operation())}
        except Exception as error:  # noqa: BLE001 - the client hears it; the server goes on
            if self.maillog is not None:
                self.maillog.line("control", f"warning: {line.decode(errors='replace').strip()}"
                                             f" failed: {error!r}")
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}

    def _parse(self, line: bytes) -> tuple[str, Callable[[], Awaitable[list[str]]]]:
        """The checked request's op, and the op as a call of the queue manager. Raises
        ValueError saying what is wrong, or whatever json.loads raises (RecursionError)."""
        request = json.loads(line)
        op = request.get("op") if isinstance(request, dict) else None
        if not isinstance(op, str) or op not in OPS:
            raise ValueError(f'"op" must be one of {", ".join(sorted(OPS))}')
        if op == "active":
            return op, self._active
        if op == "tls-report":  # TLS-RPT (engine.tls.tlsrpt_send): the server's own hook
            day = request.get("day")
            if not isinstance(day, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
                raise ValueError('"day" must be a date, YYYY-MM-DD')
            if self.tls_report is None:
                raise ValueError("TLS-RPT is off (smtp_tlsrpt_enable)")
            return op, lambda: self.tls_report(day)
        if op == "flush":
            domain = request.get("domain")
            if domain is not None and not isinstance(domain, str):
                raise ValueError('"domain" must be a string or null')
            return op, lambda: self.qmgr.flush(domain)
        ids = _ids(request.get("ids"))
        if op == "delete":
            deferred_only = request.get("deferred_only", False)
            if not isinstance(deferred_only, bool):
                raise ValueError('"deferred_only" must be true or false')
            return op, lambda: self.qmgr.delete(ids, deferred_only=deferred_only)
        method = getattr(self.qmgr, op)
        return op, lambda: method(ids)

    async def _active(self) -> list[str]:
        """The queue IDs in the queue manager's active queue: being delivered now."""
        return list(self.qmgr._active)


def _bind(address: _SocketAddress) -> socket.socket:
    """A listening socket at the address, mode 0600 before anyone can connect. A socket file
    left by a server that died is replaced; one that answers is another server's."""
    if address.path.exists() or address.path.is_symlink():
        try:
            _connect(address.address, timeout=1.0).close()
        except OSError:
            address.unlink()
        else:
            raise ControlError(f"queue_directory {address.path.parent} is in use: another "
                               f"tern serve answers on {address.path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address.address)
        address.chmod(0o600)  # before listen(): until then a connect is refused
        sock.listen(16)
    except OSError as error:
        sock.close()
        raise ControlError(f"control socket {address.path}: "
                           f"{error.strerror or error}") from error
    sock.setblocking(False)
    return sock


# -- client ----------------------------------------------------------------------------------


def _connect(address: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def worker_socket(shard: int) -> str:
    """The control socket's name of the worker that owns spool shard ``shard``."""
    return f"{SOCKET_NAME}{shard}"


def shard_sockets(shard: int) -> tuple[str, ...]:
    """The names a server answering for spool shard ``shard`` may listen on: its worker's, and
    for shard 0 a single-process server's."""
    return (worker_socket(shard), SOCKET_NAME) if shard == 0 else (worker_socket(shard),)


def socket_names(queue_directory: Path) -> list[str]:
    """Every control socket file in the queue directory (``control``, ``control0``…), answering
    or left by a server that died."""
    directory = Path(queue_directory)
    return sorted(path.name for path in directory.glob(f"{SOCKET_NAME}*")
                  if path.name[len(SOCKET_NAME):].isdigit() or path.name == SOCKET_NAME)


def request(queue_directory: Path, op: str, *, timeout: float = 120.0,
            name: str = SOCKET_NAME, **arguments) -> list[str]:
    """Ask the server answering on ``<queue_directory>/<name>`` to perform ``op``; returns the
    queue IDs it affected (for ``active``: those in its active queue). Raises ControlUnavailable
    when no server answers, ControlError when the server refuses or fails."""
    address = _SocketAddress(Path(queue_directory), name)
    try:
        try:
            sock = _connect(address.address, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise ControlUnavailable(f"no server answers on {address.path}") from error
        except OSError as error:
            raise ControlError(f"{address.path}: {error.strerror or error}") from error
    finally:
        address.close()
    with sock:
        try:
            sock.sendall(json.dumps({"op": op, **arguments}).encode() + b"\n")
            with sock.makefile("rb") as replies:
                line = replies.readline(REPLY_LIMIT)
        except OSError as error:
            raise ControlError(f"{address.path}: {error.strerror or error}") from error
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"{address.path}: no valid reply (the server stopped?)")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the server refused the request")))
    return list(reply.get("ids") or [])
