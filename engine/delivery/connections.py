"""SMTP connection cache: idle, ready sessions kept per next-hop destination for the next message.

Postfix's connection cache (CONNECTION_CACHE_README) inside one process: a delivery that ends
with its session still ready gives it back here instead of sending QUIT, and the next delivery
to the same destination takes it and starts with RSET (engine.smtp.client). Bounded in time,
uses and count; timers are loop.call_later handles, never a task per connection.
Trusts its caller (the SMTP delivery agent); reads nothing from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from engine.config import Config
from engine.smtp.client import Client, Phase, Send

MAX_IDLE = 1000  # idle connections in all, so that a burst of destinations cannot hoard sockets


@dataclass(eq=False)
class Connection:
    """One open SMTP session: the socket, its client core, and when it was opened."""

    client: Client
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened_at: float = field(default_factory=time.monotonic)
    tls: Any = None  # engine.delivery.smtp's TLS job (policy, context, names) for STARTTLS

    def ready(self) -> bool:
        """Between transactions and not seen closed; only RSET tells more."""
        return (
            self.client.phase is Phase.READY
            and not self.writer.is_closing()
            and not self.reader.at_eof()
        )

    def quit(self) -> None:
        """Send QUIT and close without waiting for the reply (Postfix's smtp_skip_quit_response),
        so that an expiring timer needs no task."""
        self.client.quit()
        while isinstance(event := self.client.next_event(), Send):
            if not self.writer.is_closing():
                with contextlib.suppress(OSError):
                    self.writer.write(event.data)
        self.shut()

    def shut(self) -> None:
        """Close the socket; a peer that does not read loses what is still buffered."""
        if self.writer.transport.get_write_buffer_size():
            self.writer.transport.abort()
        else:
            self.writer.close()

    async def close(self) -> None:
        """Close the socket and wait until it is closed."""
        self.shut()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class ConnectionCache:
    """Idle sessions by destination (NextHop.destination: transport and next hop).

    Postfix also caches each session under its server's IP address, so that another
    destination served by the same host (or an MX host met through a different domain) finds
    it; this cache has only the destination key. A session is kept at most
    ``smtp_connection_cache_time_limit`` seconds idle; it is not reused once
    ``smtp_connection_reuse_time_limit`` seconds have passed since it was opened, nor once it was
    reused ``smtp_connection_reuse_count_limit`` times (Postfix: with a limit of N, a connection
    carries up to N + 1 transactions; 0 = no limit). At most ``max_idle`` sessions are kept in
    all and ``max_idle_per_destination`` (default: the destination concurrency limit, which
    already bounds how many deliveries could give one back) per destination; when full, the
    oldest idle one is closed. One cache per event loop (per worker process).
    """

    def __init__(
        self,
        config: Config,
        *,
        max_idle: int = MAX_IDLE,
        max_idle_per_destination: int | None = None,
    ) -> None:
        self.idle_time_limit = config.smtp_connection_cache_time_limit
        self.reuse_time_limit = config.smtp_connection_reuse_time_limit
        self.reuse_count_limit = config.smtp_connection_reuse_count_limit
        self.max_idle = max_idle
        self.max_idle_per_destination = (
            max_idle_per_destination or config.default_destination_concurrency_limit
        )
        self._by_destination: dict[str, list[Connection]] = {}  # oldest first
        self._timers: dict[Connection, tuple[str, asyncio.TimerHandle]] = {}  # oldest first
        self._closed = False

    def __len__(self) -> int:
        return len(self._timers)

    def take(self, destination: str) -> Connection | None:
        """The most recently cached session to ``destination`` that may still be used (it is
        no longer cached), or None. Expired or visibly closed ones met on the way are closed."""
        idle = self._by_destination.get(destination)
        while idle:
            connection = idle[-1]
            self._forget(connection)
            if self._reusable(connection):
                return connection
            connection.quit()
        return None

    def put(self, destination: str, connection: Connection) -> bool:
        """Keep ``connection`` (ready, after a transaction) for the next delivery to
        ``destination``. False when it may not be reused: the caller QUITs it."""
        if self._closed or connection in self._timers or not self._reusable(connection):
            return False
        idle = self._by_destination.get(destination, [])
        if len(idle) >= self.max_idle_per_destination:
            self._expire(idle[0])
        if len(self._timers) >= self.max_idle:
            self._expire(next(iter(self._timers)))
        self._by_destination.setdefault(destination, []).append(connection)
        timer = asyncio.get_running_loop().call_later(
            self.idle_time_limit, self._expire, connection
        )
        self._timers[connection] = (destination, timer)
        return True

    async def close(self) -> None:
        """QUIT and close every idle session (at shutdown); put() refuses from now on."""
        self._closed = True
        idle = list(self._timers)
        for connection in idle:
            self._expire(connection)
        await asyncio.gather(*(connection.wait_closed() for connection in idle))

    def _reusable(self, connection: Connection) -> bool:
        """Ready, younger than the reuse time limit, reused fewer times than the count limit
        (Postfix's THIS_SESSION_IS_EXPIRED, checked when a session is cached and taken)."""
        reuses = connection.client.transactions - 1
        return (
            connection.ready()
            and time.monotonic() - connection.opened_at < self.reuse_time_limit
            and not (self.reuse_count_limit and reuses >= self.reuse_count_limit)
        )

    def _expire(self, connection: Connection) -> None:
        """Drop an idle session: QUIT and close it."""
        self._forget(connection)
        connection.quit()

    def _forget(self, connection: Connection) -> None:
        destination, timer = self._timers.pop(connection)
        timer.cancel()
        idle = self._by_destination[destination]
        idle.remove(connection)
        if not idle:
            del self._by_destination[destination]
