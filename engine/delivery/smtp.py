"""SMTP delivery agent: the asyncio adapter that runs engine.smtp.client over TCP.

Resolves the next hop, tries its addresses in order until one takes the transaction, and returns
one result per recipient. Thin on purpose: every protocol decision is in the sans-I/O client.
Trusts the request (from the spool) and the configuration; nothing from the network.
"""

import asyncio
import contextlib
import os
import time

from engine.config import Config
from engine.delivery import (
    DeliveryError,
    DeliveryOutcome,
    DeliveryRequest,
    TransientFailure,
)
from engine.dns import Resolver
from engine.smtp.client import (
    Client,
    Closed,
    Envelope,
    NeedData,
    Ready,
    Send,
    SessionFailed,
    Stage,
    TransactionDone,
)

READ_SIZE = 65536

# Postfix's smtp_*_timeout for each stage (the greeting falls under smtp_helo_timeout).
STAGE_TIMEOUTS = {
    Stage.GREETING: "smtp_helo_timeout",
    Stage.EHLO: "smtp_helo_timeout",
    Stage.HELO: "smtp_helo_timeout",
    Stage.MAIL: "smtp_mail_timeout",
    Stage.RCPT: "smtp_rcpt_timeout",
    Stage.DATA: "smtp_data_init_timeout",
    Stage.BODY: "smtp_data_xfer_timeout",
    Stage.DOT: "smtp_data_done_timeout",
    Stage.RSET: "smtp_mail_timeout",
    Stage.QUIT: "smtp_quit_timeout",
}


async def deliver(request: DeliveryRequest, config: Config, resolver: Resolver) -> DeliveryOutcome:
    """Deliver ``request`` to its next hop. Raises DeliveryError when no server took the
    transaction (DNS failure, every address refused or failed before MAIL FROM)."""
    started = time.monotonic()
    if not request.recipients:
        return DeliveryOutcome([])
    hop = request.nexthop
    hosts = await resolver.mx_hosts(hop.host) if hop.mx_lookup else [hop.host]
    failures: list[DeliveryError] = []
    for host in hosts:
        try:
            addresses = await resolver.addresses(host)
        except DeliveryError as exc:
            failures.append(exc)
            continue
        for address in addresses:
            try:
                return await _attempt(request, config, host, address, started)
            except DeliveryError as exc:
                failures.append(exc)
    raise _no_server_took_it(failures, hop.host)


def _no_server_took_it(failures: list[DeliveryError], destination: str) -> DeliveryError:
    """The error for a delivery that no host took. As Postfix: it defers when any host failed
    transiently, and bounces only when every host failed permanently (no address at all). The
    reason given is the last one a server said (e.g. a refused greeting), else the last
    transient one (connection refused, timeout, DNS)."""
    transient = [f for f in failures if isinstance(f, TransientFailure)]
    if not transient:
        if failures:
            return failures[-1]
        return TransientFailure("4.4.3", f"no mail host for {destination}")
    said = [f for f in transient if f.relay != "none"]
    reason = (said or transient)[-1]
    # Postfix's smtp_skip_5xx_greeting: a server that refuses the session defers, never bounces.
    return TransientFailure("4" + reason.dsn[1:], reason.text, reason.relay)


async def _attempt(
    request: DeliveryRequest, config: Config, host: str, address: str, started: float
) -> DeliveryOutcome:
    """One connection to ``address``. Raises TransientFailure when the session never got to
    a transaction (so the caller tries the next address)."""
    port = request.nexthop.port
    peer = f"{host}[{address}]"
    relay = f"{peer}:{port}"
    try:
        async with asyncio.timeout(config.smtp_connect_timeout):
            reader, writer = await asyncio.open_connection(address, port)
    except TimeoutError:  # no session: Postfix logs relay=none
        raise TransientFailure("4.4.1", f"connect to {relay}: Connection timed out") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise TransientFailure("4.4.1", f"connect to {relay}: {why}") from None

    client = Client(config.expand(config.smtp_helo_name), peer=peer, relay=relay)
    envelope = Envelope(request.sender, request.recipients, request.content, request.body_8bit)
    failed: SessionFailed | None = None
    done: TransactionDone | None = None
    ready_at = done_at = started
    try:
        while True:
            match client.next_event():
                case Send(data=data, stage=stage):
                    await _write(writer, data, _timeout(config, stage), client)
                case NeedData(stage=stage):
                    await _read(reader, _timeout(config, stage), client)
                case Ready():
                    ready_at = time.monotonic()
                    client.start_transaction(envelope)
                case TransactionDone() as done:
                    done_at = time.monotonic()
                    client.quit()
                case SessionFailed() as failed:
                    pass
                case Closed():
                    break
    finally:
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()  # a stalled peer must not hold the close
        else:
            writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if done is None:
        failed = failed or SessionFailed("4.4.2", f"lost connection with {peer}")
        raise TransientFailure(failed.dsn, failed.text, relay)
    return DeliveryOutcome(
        list(done.results),
        connect_seconds=ready_at - started,
        transfer_seconds=done_at - ready_at,
    )


def _timeout(config: Config, stage: Stage) -> float:
    return getattr(config, STAGE_TIMEOUTS[stage])


async def _write(writer: asyncio.StreamWriter, data: bytes, timeout: float, client: Client) -> None:
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            await writer.drain()
    except TimeoutError:
        client.timed_out()
    except OSError:
        client.receive_data(b"")


async def _read(reader: asyncio.StreamReader, timeout: float, client: Client) -> None:
    try:
        async with asyncio.timeout(timeout):
            data = await reader.read(READ_SIZE)
    except TimeoutError:
        client.timed_out()
        return
    except OSError:
        data = b""
    client.receive_data(data)
