"""LMTP delivery agent (RFC 2033): the SMTP agent's adapter with the client core in LMTP mode.

The next hop is ``[host]:port`` / ``host:port`` over TCP (port 24 by default, no MX lookup,
as Postfix's lmtp) or ``unix:/path``. The client core sends LHLO and reads one reply per
accepted recipient after the final "." (or after BDAT LAST when the server offers CHUNKING,
unless lmtp_discard_lhlo_keywords has "chunking"), so each recipient gets its own result. The
I/O loop is engine.delivery.smtp's; it reads smtp_*_timeout names, so it runs here on a view of
the Config where those hold the lmtp_* values (Postfix's smtp(8) and lmtp(8) are likewise one
program reading two sets of parameter names). One session per delivery, closed with QUIT.
"""

import asyncio
import dataclasses
import time

from engine.config import Config
from engine.config.derived import per_config
from engine.delivery import (
    DeliveryError,
    DeliveryOutcome,
    DeliveryRequest,
)
from engine.delivery import smtp as smtp_agent
from engine.delivery.connections import Connection
from engine.dns import Resolver
from engine.smtp.client import Client, Envelope

# The shared I/O loop's timeout (engine.delivery.smtp.STAGE_TIMEOUTS) -> Postfix's lmtp twin.
LMTP_TIMEOUTS = {
    "smtp_helo_timeout": "lmtp_lhlo_timeout",  # the greeting and LHLO, as Postfix's
    "smtp_mail_timeout": "lmtp_mail_timeout",
    "smtp_rcpt_timeout": "lmtp_rcpt_timeout",
    "smtp_data_init_timeout": "lmtp_data_init_timeout",
    "smtp_data_xfer_timeout": "lmtp_data_xfer_timeout",
    "smtp_data_done_timeout": "lmtp_data_done_timeout",
    "smtp_quit_timeout": "lmtp_quit_timeout",
    "smtp_rset_timeout": "lmtp_rset_timeout",
}

@per_config
def lmtp_view(config: Config) -> Config:
    """``config`` with its smtp_*_timeout fields holding the lmtp_* values (one per Config
    object: a process has one, so this costs one copy)."""
    return dataclasses.replace(
        config, **{smtp: getattr(config, lmtp) for smtp, lmtp in LMTP_TIMEOUTS.items()})


async def deliver(request: DeliveryRequest, config: Config, resolver: Resolver
                  ) -> DeliveryOutcome:
    started = time.monotonic()
    if not request.recipients:
        return DeliveryOutcome([])
    config = lmtp_view(config)
    hop = request.nexthop
    # as smtp's: SMTPUTF8 (5.6.7 when needed and not offered) and the DSN request go along
    envelope = Envelope(request.sender, request.recipients, request.content, request.body_8bit,
                        ret=request.ret, envid=request.envid, notify=request.notify,
                        orcpt=request.orcpt, smtputf8=request.smtputf8)
    if hop.host.startswith("unix:"):
        try:
            connection = await _connect_unix(config, hop.host[5:])
            return await smtp_agent._transact(connection, envelope, config, started, None, hop)
        except DeliveryError as exc:  # a refused session defers with a 4.x.x code, as TCP's
            raise smtp_agent._no_server_took_it([exc], hop.host) from None
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
    return Client(config.expand(config.lmtp_lhlo_name), peer=peer, relay=relay, lmtp=True,
                  discard_ehlo_keywords=config.lmtp_discard_lhlo_keywords,
                  chunk_size=smtp_agent.CHUNK_SIZE,
                  mime_downgrade=not config.disable_mime_output_conversion)


def _connect_timeout(config: Config) -> float | None:
    """lmtp_connect_timeout; 0 leaves it to the operating system, as Postfix."""
    return config.lmtp_connect_timeout or None


async def _connect_tcp(config: Config, host: str, address: str, port: int) -> Connection:
    peer = f"{host}[{address}]"
    relay = f"{peer}:{port}"
    reader, writer = await smtp_agent.connected(asyncio.open_connection(address, port), relay,
                                                _connect_timeout(config))
    return Connection(_client(config, peer, relay), reader, writer)


async def _connect_unix(config: Config, path: str) -> Connection:
    """As Postfix names a UNIX-domain peer: ``myhostname[/path]``."""
    peer = f"{config.myhostname}[{path}]"
    reader, writer = await smtp_agent.connected(asyncio.open_unix_connection(path), path,
                                                _connect_timeout(config))
    return Connection(_client(config, peer, peer), reader, writer)
