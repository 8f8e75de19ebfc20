"""SMTP delivery agent: the asyncio adapter that runs engine.smtp.client over TCP.

Resolves the next hop, tries its addresses in order until one takes the transaction, and returns
one result per recipient. With a ConnectionCache it first tries an idle session to the same
destination, and gives the session back after the transaction instead of QUIT. Thin on purpose:
every protocol decision is in the sans-I/O client.
Trusts the request (from the spool) and the configuration; nothing from the network.
"""

import asyncio
import dataclasses
import os
import time

from engine.config import Config
from engine.delivery import (
    DeliveryError,
    DeliveryOutcome,
    DeliveryRequest,
    NextHop,
    RecipientResult,
    TransientFailure,
)
from engine.delivery.connections import Connection, ConnectionCache
from engine.dns import Resolver
from engine.smtp.client import (
    Client,
    Closed,
    Envelope,
    Event,
    NeedData,
    Phase,
    Ready,
    ReuseFailed,
    Send,
    SessionFailed,
    Stage,
    TransactionDone,
)

READ_SIZE = 65536
CHUNK_SIZE = 1 << 20  # the largest BDAT chunk: one write, bounded memory at the next hop

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
    Stage.BDAT: "smtp_data_done_timeout",  # the last chunk's reply is the message's
    Stage.RSET: "smtp_rset_timeout",  # short: it probes whether a cached connection lives
    Stage.QUIT: "smtp_quit_timeout",
}


async def deliver(
    request: DeliveryRequest,
    config: Config,
    resolver: Resolver,
    connections: ConnectionCache | None = None,
) -> DeliveryOutcome:
    """Deliver ``request`` to its next hop. Raises DeliveryError when no server took the
    transaction (DNS failure, every address refused or failed before MAIL FROM). With
    ``connections``, a cached session to the destination goes first (a dead one is dropped and
    counts as no attempt), and a session that may be reused goes back there afterwards."""
    started = time.monotonic()
    if not request.recipients:
        return DeliveryOutcome([])
    hop = request.nexthop
    envelope = Envelope(
        request.sender,
        request.recipients,
        request.content,
        request.body_8bit,
        ret=request.ret,
        envid=request.envid,
        notify=request.notify,
        orcpt=request.orcpt,
        smtputf8=request.smtputf8,
    )
    if connections is not None:
        while (cached := connections.take(hop.destination)) is not None:
            try:
                return await _transact(cached, envelope, config, started, connections, hop)
            except _DeadSession:
                continue  # nothing was sent: try the next cached one, then a new connection
    hosts = await resolver.mx_hosts(hop.host) if hop.mx_lookup else [hop.host]
    failures: list[DeliveryError] = []
    servers: list[tuple[str, str]] = []  # (host, address), at most smtp_mx_address_limit
    address_limit = config.smtp_mx_address_limit
    for host in hosts:
        if address_limit and len(servers) >= address_limit:
            break
        try:
            addresses = await resolver.addresses(host)
        except DeliveryError as exc:
            failures.append(exc)
            continue
        servers += [(host, address) for address in addresses]
    if address_limit:
        del servers[address_limit:]
    final: dict[str, RecipientResult] = {}
    outcome: DeliveryOutcome | None = None
    sessions = 0
    dsn_passed = True  # every server that got a recipient owes its DSN notices
    for index, (host, address) in enumerate(servers):
        try:
            connection = await _connect(config, host, address, hop.port)
            outcome = await _transact(connection, envelope, config, started, connections, hop)
        except DeliveryError as exc:  # no session: not counted against smtp_mx_session_limit
            failures.append(exc)
            continue
        sessions += 1
        dsn_passed = dsn_passed and outcome.dsn_passed
        retry = [r.recipient for r in outcome.results if _next_server_may_take(r)]
        final.update((r.recipient, r) for r in outcome.results)
        last = index == len(servers) - 1
        if not retry or last or sessions == config.smtp_mx_session_limit:
            break
        # Postfix: recipients a server deferred go to the next MX host in the same delivery
        envelope = dataclasses.replace(envelope, recipients=retry)
    if outcome is None:
        raise _no_server_took_it(failures, hop.host)
    outcome.results = [final[r] for r in request.recipients]
    outcome.dsn_passed = dsn_passed
    return outcome


def _next_server_may_take(result: RecipientResult) -> bool:
    """Whether another MX host may get ``result``'s recipient in the same delivery: a server
    deferred it with a 4xx reply. A lost connection or a timeout (4.4.2) is not retried there:
    after the end of data the message may have been taken already."""
    return result.status == "deferred" and result.reply.startswith("host ")


class _DeadSession(TransientFailure):
    """A cached session failed before the server answered MAIL FROM (ReuseFailed)."""


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


async def _connect(config: Config, host: str, address: str, port: int) -> Connection:
    """A TCP connection to ``address`` with a new client core (no bytes exchanged yet)."""
    peer = f"{host}[{address}]"
    relay = f"{peer}:{port}"
    # Postfix's smtp_bind_address / smtp_bind_address6: the source address of this family
    bind = config.smtp_bind_address6 if ":" in address else config.smtp_bind_address
    try:
        async with asyncio.timeout(config.smtp_connect_timeout):
            reader, writer = await asyncio.open_connection(
                address, port, local_addr=(bind, 0) if bind else None
            )
    except TimeoutError:  # no session: Postfix logs relay=none
        raise TransientFailure("4.4.1", f"connect to {relay}: Connection timed out") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise TransientFailure("4.4.1", f"connect to {relay}: {why}") from None
    client = Client(
        config.expand(config.smtp_helo_name),
        peer=peer,
        relay=relay,
        discard_ehlo_keywords=config.smtp_discard_ehlo_keywords,
        chunk_size=CHUNK_SIZE,
        mime_downgrade=not config.disable_mime_output_conversion,
    )
    return Connection(client, reader, writer)


async def _transact(
    connection: Connection,
    envelope: Envelope,
    config: Config,
    started: float,
    cache: ConnectionCache | None,
    hop: NextHop,
) -> DeliveryOutcome:
    """One transaction on ``connection`` (new, or cached and ready), then the connection goes
    to ``cache`` or is closed. Raises TransientFailure when the session never got to a
    transaction (so the caller tries the next address), _DeadSession for a dead cached one."""
    client = connection.client
    kept = False
    try:
        ready_at = started
        if client.phase is Phase.READY:  # cached: no greeting or EHLO, the RSET comes first
            ready_at = time.monotonic()
            client.start_transaction(envelope)
        event = await _next_event(connection, config)
        if isinstance(event, Ready):  # a new session: greeting and EHLO done
            ready_at = time.monotonic()
            client.start_transaction(envelope)
            event = await _next_event(connection, config)
        if isinstance(event, TransactionDone):
            done_at = time.monotonic()
            kept = cache is not None and cache.put(hop.destination, connection)
            if not kept:
                client.quit()
                await _finish(connection, config)
            return DeliveryOutcome(
                list(event.results),
                connect_seconds=ready_at - started,
                transfer_seconds=done_at - ready_at,
                conn_use=client.transactions,
                dsn_passed=event.dsn_passed,
            )
        await _finish(connection, config)
        if isinstance(event, ReuseFailed):
            raise _DeadSession("4.4.2", event.text, client.relay)
        if not isinstance(event, SessionFailed):
            event = SessionFailed("4.4.2", f"lost connection with {client.peer}")
        raise TransientFailure(event.dsn, event.text, client.relay)
    finally:
        if not kept:
            await connection.close()


async def _next_event(connection: Connection, config: Config) -> Event:
    """Do the client's I/O until it has something else to say (Ready, an outcome, Closed)."""
    client = connection.client
    while True:
        match client.next_event():
            case Send(data=data, stage=stage):
                await _write(connection.writer, data, _timeout(config, stage), client)
            case NeedData(stage=stage):
                await _read(connection.reader, _timeout(config, stage), client)
            case event:
                return event


async def _finish(connection: Connection, config: Config) -> None:
    """Run the client to its end (QUIT and its reply, after quit() or a failed session)."""
    while not isinstance(await _next_event(connection, config), Closed):
        pass


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
