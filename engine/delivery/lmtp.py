"""LMTP delivery agent (RFC 2033): the SMTP agent's adapter with the client core in LMTP mode.

The next hop is ``[host]:port`` / ``host:port`` over TCP (port 24 by default, no MX lookup,
as Postfix's lmtp) or ``unix:/path``. The client core sends LHLO and reads one reply per
accepted recipient after the final ".", so each recipient gets its own result. The I/O loop is
engine.delivery.smtp's (same stage timeouts); one session per delivery, closed with QUIT.
"""

import asyncio
import os
import time

from engine.config import Config
from engine.delivery import (
    DeliveryError,
    DeliveryOutcome,
    DeliveryRequest,
    TransientFailure,
)
from engine.delivery import smtp as smtp_agent
from engine.delivery.connections import Connection
from engine.dns import Resolver
from engine.smtp.client import Client, Envelope


async def deliver(request: DeliveryRequest, config: Config, resolver: Resolver
                  ) -> DeliveryOutcome:
    started = time.monotonic()
    if not request.recipients:
        return DeliveryOutcome([])
    hop = request.nexthop
    envelope = Envelope(request.sender, request.recipients, request.content, request.body_8bit)
    if hop.host.startswith("unix:"):
        connection = await _connect_unix(config, hop.host[5:])
        return await smtp_agent._transact(connection, envelope, config, started, None, hop)
    failures: list[DeliveryError] = []
    try:
        addresses = await resolver.addresses(hop.host)
    except DeliveryError as exc:
        failures.append(exc)
        addresses = []
    for address in addresses:
        try:
            connection = await _connect_tcp(config, hop.host, address, hop.port)
            return await smtp_agent._transact(connection, envelope, config, started, None, hop)
        except DeliveryError as exc:
            failures.append(exc)
    raise smtp_agent._no_server_took_it(failures, hop.host)


def _client(config: Config, peer: str, relay: str) -> Client:
    return Client(config.expand(config.smtp_helo_name), peer=peer, relay=relay, lmtp=True)


async def _connect_tcp(config: Config, host: str, address: str, port: int) -> Connection:
    peer = f"{host}[{address}]"
    relay = f"{peer}:{port}"
    try:
        async with asyncio.timeout(config.smtp_connect_timeout):
            reader, writer = await asyncio.open_connection(address, port)
    except TimeoutError:
        raise TransientFailure("4.4.1", f"connect to {relay}: Connection timed out") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise TransientFailure("4.4.1", f"connect to {relay}: {why}") from None
    return Connection(_client(config, peer, relay), reader, writer)


async def _connect_unix(config: Config, path: str) -> Connection:
    """As Postfix names a UNIX-domain peer: ``myhostname[/path]``."""
    peer = f"{config.myhostname}[{path}]"
    try:
        async with asyncio.timeout(config.smtp_connect_timeout):
            reader, writer = await asyncio.open_unix_connection(path)
    except TimeoutError:
        raise TransientFailure("4.4.1", f"connect to {path}: Connection timed out") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise TransientFailure("4.4.1", f"connect to {path}: {why}") from None
    return Connection(_client(config, peer, peer), reader, writer)
