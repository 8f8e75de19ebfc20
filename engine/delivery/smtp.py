"""SMTP delivery agent: the asyncio adapter that runs engine.smtp.client over TCP.

Resolves the next hop, tries its addresses in order until one takes the transaction, and returns
one result per recipient. With a ConnectionCache it first tries an idle session to the same
destination, and gives the session back after the transaction instead of QUIT. Thin on purpose:
every protocol decision is in the sans-I/O client. Outbound TLS (engine.tls.client): the
destination's policy picks STARTTLS's mode for the client core, or TLS from the first byte
(smtp_tls_wrappermode); on StartTls this adapter runs the handshake with the loop's
``start_tls``, logs Postfix's "… TLS connection established to …" line and checks the
certificate against the policy. At "may", a failed handshake is retried once in plaintext on
a new connection to the same address, as Postfix does.
SMTP AUTH (engine.delivery.sasl): the credentials for each server go to the client core, and
a session authenticated with a sender's own credentials is cached under a key naming them.
Trusts the request (from the spool) and the configuration; nothing from the network.
"""

import asyncio
import dataclasses
import os
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from engine.config import Config
from engine.config.derived import per_config
from engine.delivery import (
    DeliveryError,
    DeliveryOutcome,
    DeliveryRequest,
    NextHop,
    PermanentFailure,
    RecipientResult,
    TransientFailure,
    sasl,
)
from engine.delivery.connections import Connection, ConnectionCache
from engine.delivery.myself import Myself
from engine.delivery.route import nexthop_as_written
from engine.dns import Resolver
from engine.log import Maillog
from engine.smtp.client import (
    Client,
    Envelope,
    Event,
    NeedData,
    Phase,
    Ready,
    ReuseFailed,
    Send,
    SessionFailed,
    Stage,
    StartTls,
    TransactionDone,
)
from engine.smtp.sasl_client import SaslLogin
from engine.tls.client import (
    PolicyError,
    PolicyFinder,
    TlsPolicy,
    check_peer,
    client_context,
    not_dane,
    resolve_dane,
)
from engine.tls.policy import DANE
from engine.tls.server import describe
from engine.tls.sts_fetch import sts_policy
from engine.tls.tlsrpt_record import Reporter, reporter
from engine.tls.trust import trust_store

READ_SIZE = 65536
CHUNK_SIZE = 1 << 20  # the largest BDAT chunk: bounded memory at the next hop
WRITE_SLICE = 1 << 16  # bytes written between two drains, each under the stage's timeout

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
    Stage.STARTTLS: "smtp_helo_timeout",
    Stage.AUTH: "smtp_helo_timeout",  # Postfix's AUTH dialogue is part of its EHLO stage
}


async def deliver(
    request: DeliveryRequest,
    config: Config,
    resolver: Resolver,
    connections: ConnectionCache | None = None,
    maillog: Maillog | None = None,
    myself: Myself | None = None,
    finder: PolicyFinder | None = None,
) -> DeliveryOutcome:
    """``_deliver``, where a relay host that does not resolve or loops back defers with
    4.3.5 instead of bouncing, as Postfix's smtp_connect.c: it is a configuration problem, not
    the recipient's. A server's own 5xx (relay != "none") still bounces."""
    try:
        return await _deliver(request, config, resolver, connections, maillog, myself, finder)
    except PermanentFailure as error:
        setting = request.nexthop.relayhost
        if not setting or error.relay != "none":
            raise
        if maillog is not None:
            maillog.line("smtp", f"warning: {setting} configuration problem")
        raise TransientFailure("4.3.5", error.text) from None


async def _deliver(
    request: DeliveryRequest,
    config: Config,
    resolver: Resolver,
    connections: ConnectionCache | None = None,
    maillog: Maillog | None = None,
    myself: Myself | None = None,
    finder: PolicyFinder | None = None,
) -> DeliveryOutcome:
    """Deliver ``request`` to its next hop. Raises DeliveryError when no server took the
    transaction (DNS failure, every address refused or failed before MAIL FROM). With
    ``connections``, a cached session to the destination goes first (a dead one is dropped and
    counts as no attempt), and a session that may be reused goes back there afterwards.
    ``myself``: where this Tern takes mail (built from ``config`` when not given), for the
    loop check; ``finder``: the transport's TLS policy finder (engine.delivery.agents makes
    one per transport; else one cached per Config)."""
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
    auth = await sasl.for_delivery(config, request.sender)
    try:
        policy = (finder or _policy_finder(config)).policy(nexthop_as_written(hop))
    except PolicyError as exc:  # never deliver with less TLS than the administrator wrote
        raise TransientFailure("4.7.5", f"TLS policy lookup for {hop.host}: {exc}") from None
    rpt = reporter(config, hop.host)  # TLS-RPT (RFC 8460): None unless smtp_tlsrpt_enable
    # RFC 8461: only for MX delivery, and never weakening a stronger local policy. At "dane",
    # too: it applies to every MX host that DANE does not cover (§2: DANE first).
    sts = None
    if config.smtp_mta_sts_enable and hop.mx_lookup and policy.level in ("none", "may", "dane"):
        sts_failures: list[tuple[str, str]] = []
        sts = await sts_policy(config, resolver.dnssec, resolver, hop.host, sts_failures)
        if rpt is not None:
            rpt.sts = sts
            for result, why in sts_failures:
                rpt.record(result, reason=why, policy_type="sts")
    cache_key = _cache_key(auth.cache_key(hop.destination), policy, sts)
    if connections is not None:
        while (cached := connections.take(cache_key)) is not None:
            try:
                return await _transact(cached, envelope, config, started, connections, hop,
                                       cache_key)
            except _DeadSession:
                continue  # nothing was sent: try the next cached one, then a new connection
    hosts = [hop.host]
    if hop.mx_lookup:  # DNSSEC status only when DANE needs it (RFC 7672 §2.2.1: secure MX)
        mx = await resolver.mx_lookup(hop.host, dnssec=policy.level in DANE)
        hosts = mx.items
        if policy.level in DANE and not mx.secure:
            try:
                policy = not_dane(policy, "non DNSSEC destination")
            except TransientFailure as exc:
                if rpt is not None:
                    _record_dane_failure(rpt, hop.host, exc)
                raise
    failures: list[DeliveryError] = []
    servers: list[tuple[str, str]] = []  # (host, address), at most smtp_mx_address_limit
    address_limit = config.smtp_mx_address_limit
    for host in hosts:
        if address_limit and len(servers) >= address_limit:
            break
        host_policy = policy
        try:
            if sts is not None and sts.mode != "none" and policy.level not in DANE:
                host_policy = _sts_host_policy(sts, host, TlsPolicy("may"), hop, rpt, maillog,
                                               request.queue_id)
            found = await resolver.address_lookup(host, dnssec=host_policy.level in DANE)
            addresses = found.items
            dnssec = resolver.dnssec if host_policy.level in DANE else None  # made on need
            host_policy = await resolve_dane(host_policy, dnssec, host, hop.port,
                                             secure=found.secure)
            if sts is not None and sts.mode != "none" and host_policy.level not in DANE \
                    and policy.level in DANE:  # DANE does not cover this host: MTA-STS does
                host_policy = _sts_host_policy(sts, host, host_policy, hop, rpt, maillog,
                                               request.queue_id)
        except _StsRefused as exc:
            failures.append(exc)
            continue
        except DeliveryError as exc:
            failures.append(exc)
            if rpt is not None and host_policy.level in DANE:
                _record_dane_failure(rpt, host, exc)
            continue
        servers += [(host, address, host_policy) for address in addresses]
    if address_limit:
        del servers[address_limit:]
    servers = _without_myself(servers, hosts, hop, myself or _myself(config))
    final: dict[str, RecipientResult] = {}
    outcome: DeliveryOutcome | None = None
    sessions = 0
    dsn_passed = True  # every server that got a recipient owes its DSN notices
    for index, (host, address, host_policy) in enumerate(servers):
        try:
            outcome = await _session(config, host, address, host_policy, envelope, started,
                                     connections, hop, maillog, auth, rpt, cache_key)
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


async def _session(config: Config, host: str, address: str, policy: TlsPolicy,
                   envelope: Envelope, started: float, connections: ConnectionCache | None,
                   hop: NextHop, maillog: Maillog | None,
                   auth: sasl.DeliveryAuth | None = None,
                   rpt: Reporter | None = None, cache_key: str | None = None) -> DeliveryOutcome:
    """One server's session under its TLS policy; at "may", a failed handshake is followed by
    the same server in plaintext, as Postfix. With ``auth``, its credentials for this server;
    with ``rpt``, the TLS outcome is recorded (TLS-RPT); ``cache_key``: where the session
    goes afterwards (default: the destination, and the sender's SASL name)."""
    login = await auth.login(host, hop) if auth is not None else None
    key = cache_key or (auth.cache_key(hop.destination) if auth is not None else None)
    tls = _TlsJob(policy, host, hop.host, maillog, rpt, address)
    try:
        connection = await _connect(config, host, address, hop.port, tls, login)
        return await _transact(connection, envelope, config, started, connections, hop, key)
    except _PlaintextRetry:
        pass
    except TransientFailure as exc:
        if rpt is not None and exc.dsn == "4.7.4":  # mandatory TLS, STARTTLS not offered
            tls.report("starttls-not-supported", exc.text)
        raise
    plain = _TlsJob(TlsPolicy("none"), host, hop.host, maillog)
    connection = await _connect(config, host, address, hop.port, plain, login)
    return await _transact(connection, envelope, config, started, connections, hop, key)


class _StsRefused(TransientFailure):
    """MTA-STS enforce: the MX host is not in the policy's mx list."""


def _sts_host_policy(sts, host: str, fallback: TlsPolicy, hop: NextHop, rpt: Reporter | None,
                     maillog: Maillog | None, queue_id: str) -> TlsPolicy:
    """The TLS policy MTA-STS gives MX ``host``: enforce wants a valid certificate for the MX
    name (RFC 8461 §4.2), testing leaves ``fallback`` (opportunistic, or what DANE left) and
    logs. Raises _StsRefused for a host outside the policy's mx patterns under enforce."""
    if not sts.mx_allowed(host):
        text = f"MX host {host} does not match the MTA-STS policy of {hop.host}"
        if rpt is not None:
            rpt.record("validation-failure", host=host, reason="mx-mismatch")
        if sts.mode == "enforce":
            raise _StsRefused("4.7.5", text)
        if maillog is not None:
            maillog.line("smtp", f"{queue_id}: MTA-STS testing: {text}")
    if sts.mode == "enforce":
        return TlsPolicy("verify", ("hostname",), webpki=True)
    return fallback


def _cache_key(key: str, policy: TlsPolicy, sts) -> str:
    """The connection cache key under the destination's TLS policy, as Postfix's TLS-aware
    connection cache: a session opened under one policy (say plaintext, before an MTA-STS
    policy appeared) never carries mail that another policy now governs."""
    if policy.level != "none":
        key += f"\0tls={policy.level}:{','.join(policy.match)}"
    if sts is not None and sts.mode != "none":
        key += f"\0sts={sts.mode}:{sts.policy_id}"
    return key


def _next_server_may_take(result: RecipientResult) -> bool:
    """Whether another MX host may get ``result``'s recipient in the same delivery: a server
    deferred it with a 4xx reply, or the session was lost or timed out before any of the
    message was sent (RecipientResult.next_mx). Lost from the body on, it is not: the end of
    data may have been taken already."""
    return result.status == "deferred" and (result.next_mx or result.reply.startswith("host "))


class _DeadSession(TransientFailure):
    """A cached session failed before the server answered MAIL FROM (ReuseFailed)."""


class _PlaintextRetry(TransientFailure):
    """The TLS handshake failed at an opportunistic level: try again without TLS."""


@dataclass(frozen=True)
class _TlsJob:
    """What one connection needs for TLS: the destination's policy, the MX host name and the
    next-hop domain (for certificate name matching), and where to log the outcome."""

    policy: TlsPolicy
    host: str
    nexthop: str
    maillog: Maillog | None
    rpt: Reporter | None = None  # TLS-RPT's recorder of this destination, when enabled
    address: str = ""

    def log(self, text: str) -> None:
        if self.maillog is not None:
            self.maillog.line("smtp", text)

    def report(self, result: str, reason: str = "", sending_ip: str = "") -> None:
        if self.rpt is not None:
            self.rpt.record(result, host=self.host, policy=self.policy, address=self.address,
                            sending_ip=sending_ip, reason=reason)


_myself = per_config(Myself)  # for callers without build_agents' one (it resolves listeners)


@per_config
def _policy_finder(config: Config) -> PolicyFinder:
    """One PolicyFinder (with its opened smtp_tls_policy_maps) per Config object, for callers
    without the one their transport was built with (build_agents binds one per transport)."""
    return PolicyFinder(config)


def _without_myself(servers: list, hosts: list[str], hop: NextHop, myself: Myself) -> list:
    """The servers minus this Tern and every MX host not better than it, as Postfix's
    smtp_find_self / smtp_truncate_self. Raises PermanentFailure (5.4.6) "mail for X loops
    back to myself" when that leaves none (or when a host that is no MX list is this Tern),
    TransientFailure (4.4.4) when a better MX host had no address."""
    me = next((host for host, address, _ in servers if (address, hop.port) in myself), None)
    if me is None:
        return servers
    preference = getattr(me, "preference", None)
    if preference is None:  # [host], a relay host or an implicit MX: no better host to try
        raise PermanentFailure("5.4.6", f"mail for {hop.host} loops back to myself")
    better = [server for server in servers if server[0].preference < preference]
    if better:
        return better
    if getattr(hosts[0], "preference", preference) != servers[0][0].preference:
        raise TransientFailure("4.4.4", f"unable to find primary relay for {hop.host}")
    raise PermanentFailure("5.4.6", f"mail for {hop.host} loops back to myself")


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


async def connected(opening: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                    where: str, timeout: float | None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The streams ``opening`` gives within ``timeout``; failing that, Postfix's "connect to
    WHERE: why" as a TransientFailure with no relay (no session: Postfix logs relay=none)."""
    try:
        async with asyncio.timeout(timeout):
            return await opening
    except TimeoutError:
        raise TransientFailure("4.4.1", f"connect to {where}: Connection timed out") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise TransientFailure("4.4.1", f"connect to {where}: {why}") from None


async def _connect(config: Config, host: str, address: str, port: int,
                   tls: _TlsJob | None = None, login: SaslLogin | None = None) -> Connection:
    """A TCP connection to ``address`` with a new client core (no SMTP bytes exchanged yet; in
    wrapper mode the TLS handshake is done and checked). ``login``: AUTH with it."""
    peer = f"{host}[{address}]"
    relay = f"{peer}:{port}"
    # Postfix's smtp_bind_address / smtp_bind_address6: the source address of this family
    bind = config.smtp_bind_address6 if ":" in address else config.smtp_bind_address
    policy = tls.policy if tls is not None else TlsPolicy("none")
    wrapped = config.smtp_tls_wrappermode and tls is not None  # TLS or nothing (never plain)
    reader, writer = await connected(
        asyncio.open_connection(address, port, local_addr=(bind, 0) if bind else None),
        relay, config.smtp_connect_timeout)
    starttls = "none" if wrapped or policy.level == "none" else (
        "require" if policy.mandatory else "may")
    client = Client(
        config.expand(config.smtp_helo_name),
        peer=peer,
        relay=relay,
        discard_ehlo_keywords=config.smtp_discard_ehlo_keywords,
        chunk_size=CHUNK_SIZE,
        mime_downgrade=not config.disable_mime_output_conversion,
        starttls=starttls,
        tls_active=wrapped,
        sasl=login,
        sasl_soft_bounce=config.smtp_sasl_auth_soft_bounce,
    )
    connection = Connection(client, reader, writer, tls=tls)
    if wrapped:
        try:
            await _handshake(connection, config)
        except BaseException:
            await connection.close()
            raise
    return connection


async def _handshake(connection: Connection, config: Config) -> None:
    """TLS on the connection (after STARTTLS's 220, or at once in wrapper mode), logged and
    checked against the policy. Raises TransientFailure (or _PlaintextRetry at "may")."""
    tls: _TlsJob = connection.tls
    client = connection.client
    early = client.pending_input or bool(_buffered(connection.reader))
    if early and not client.tls_active:
        # Plaintext behind STARTTLS's 220 would be read as replies under TLS (response
        # injection, the CVE-2011-0411 class): end the session, never drop it silently.
        # No await between this check and start_tls, which stops reading the plaintext.
        why = "unexpected data after STARTTLS reply"
        tls.log(f"warning: {client.relay} sent {why}: possible response injection")
        tls.report("validation-failure", why, _local_ip(connection))
        failure = _PlaintextRetry if _may_retry_plain(tls, config) else TransientFailure
        raise failure("4.7.5", f"Cannot start TLS: {why}", client.relay)
    try:
        if early:  # wrapper mode, and the server spoke first in plaintext: no TLS server
            raise ssl.SSLError("plaintext data before the TLS handshake")
        async with asyncio.timeout(config.smtp_starttls_timeout):
            await connection.writer.start_tls(client_context(config, tls.policy),
                                              server_hostname=None)
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (
            getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
        tls.log(f"SSL_connect error to {client.relay}: {why}")
        tls.report("validation-failure", f"handshake: {why}", _local_ip(connection))
        if not _may_retry_plain(tls, config):
            raise TransientFailure("4.7.5", "Cannot start TLS: handshake failure",
                                   client.relay) from None
        raise _PlaintextRetry("4.7.5", "Cannot start TLS: handshake failure",
                              client.relay) from None
    ssl_object = connection.writer.get_extra_info("ssl_object")
    check = check_peer(tls.policy, ssl_object, tls.host, tls.nexthop,
                       config.smtp_tls_fingerprint_digest,
                       trust_store(config, webpki=tls.policy.webpki))
    if check.detail:  # as Postfix: what failed in the certificate check, then the session
        tls.log(f"{check.detail.partition(':')[0]} for {client.relay}:"
                f"{check.detail.partition(':')[2]}")
    tls.log(f"{check.trust} TLS connection established to {client.relay}:"
            f" {describe(ssl_object)}")
    if tls.rpt is not None:  # MTA-STS testing: report what enforce would have found (§5)
        audit = check if tls.rpt.audit is None or tls.policy.level != "may" else check_peer(
            tls.rpt.audit, ssl_object, tls.host, tls.nexthop,
            trust=trust_store(config, webpki=True))
        tls.report(audit.result or "success", audit.detail, _local_ip(connection))
    if check.failure:
        raise TransientFailure("4.7.5", check.failure, client.relay)


def _may_retry_plain(tls: _TlsJob, config: Config) -> bool:
    """Whether a failed TLS start may be followed by the same server in plaintext: only at an
    opportunistic level, and never in wrapper mode (a port-465 server is spoken to in TLS or
    not at all, as Postfix; "may" from MTA-STS testing or DANE's fallback included)."""
    return not tls.policy.mandatory and not config.smtp_tls_wrappermode


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes the StreamReader holds that nobody has read (asyncio has no public accessor)."""
    return len(reader._buffer)


def _local_ip(connection: Connection) -> str:
    """The connection's source address (TLS-RPT's "sending-mta-ip")."""
    sockname = connection.writer.get_extra_info("sockname")
    return sockname[0] if sockname else ""


def _record_dane_failure(rpt: Reporter, host: str, error: DeliveryError) -> None:
    """TLS-RPT for a host that DANE rejected before any session (RFC 8460 §4.3.2.1): a TLSA
    lookup that failed is "dnssec-invalid", dane-only without usable TLSA "dane-required"."""
    if error.text.startswith("TLSA lookup error"):
        rpt.record("dnssec-invalid", host=host, reason=error.text, policy_type="tlsa")
    elif error.dsn == "4.7.5":
        rpt.record("dane-required", host=host, reason=error.text, policy_type="tlsa")


async def _transact(
    connection: Connection,
    envelope: Envelope,
    config: Config,
    started: float,
    cache: ConnectionCache | None,
    hop: NextHop,
    cache_key: str | None = None,
) -> DeliveryOutcome:
    """One transaction on ``connection`` (new, or cached and ready), then the connection goes
    to ``cache`` (under ``cache_key``, default the destination) or is closed. Raises
    TransientFailure when the session never got to a transaction (so the caller tries the next
    address; PermanentFailure for a refused AUTH without soft bounce), _DeadSession for a dead
    cached one."""
    client = connection.client
    kept = False
    try:
        ready_at = started
        if client.phase is Phase.READY:  # cached: no greeting or EHLO, the RSET comes first
            ready_at = time.monotonic()
            client.start_transaction(envelope)
        event = await _next_event(connection, config)
        if isinstance(event, Ready):  # a new session: greeting and EHLO done
            if client.sasl_warning and connection.tls is not None:
                connection.tls.log(f"warning: {client.sasl_warning}")
            ready_at = time.monotonic()
            client.start_transaction(envelope)
            event = await _next_event(connection, config)
        if isinstance(event, TransactionDone):
            done_at = time.monotonic()
            kept = cache is not None and cache.put(cache_key or hop.destination, connection)
            if not kept:  # the outcome is known: it never waits for the QUIT reply
                connection.quit()
            return DeliveryOutcome(
                list(event.results),
                connect_seconds=ready_at - started,
                transfer_seconds=done_at - ready_at,
                conn_use=client.transactions,
                dsn_passed=event.dsn_passed,
            )
        connection.quit()  # nor does a failed session, before the next MX host
        if isinstance(event, ReuseFailed):
            raise _DeadSession("4.4.2", event.text, client.relay)
        if not isinstance(event, SessionFailed):
            event = SessionFailed("4.4.2", f"lost connection with {client.peer}")
        failure = PermanentFailure if event.permanent else TransientFailure
        raise failure(event.dsn, event.text, client.relay)
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
            case StartTls():
                await _handshake(connection, config)
                client.tls_started()
            case event:
                return event


def _timeout(config: Config, stage: Stage) -> float:
    return getattr(config, STAGE_TIMEOUTS[stage])


async def _write(writer: asyncio.StreamWriter, data: bytes, timeout: float, client: Client) -> None:
    """Write ``data`` a slice at a time, each drained within ``timeout``: as Postfix's
    smtp_*_timeout, the limit is on a stall (no progress), not on the whole message, so a
    slow but steady next hop gets a large body. Slices are views: the data is never copied."""
    try:
        if len(data) <= WRITE_SLICE:
            writer.write(data)
            async with asyncio.timeout(timeout):
                await writer.drain()
            return
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SLICE):
            writer.write(view[start:start + WRITE_SLICE])
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
