"""The delivery agents by transport name: what the queue manager calls for a NextHop.

Postfix's master.cf in one function: smtp, lmtp, local, virtual, error, discard, and one pipe
agent per ``[pipe_transports.NAME]`` table. Each agent takes a DeliveryRequest and returns a
DeliveryOutcome (or raises TransientFailure / PermanentFailure for the whole request).
"""

import functools
from collections.abc import Awaitable, Callable

from engine.config import Config
from engine.delivery import DeliveryOutcome, DeliveryRequest, lmtp, local, pipe, smtp, trivial
from engine.delivery.connections import ConnectionCache
from engine.delivery.myself import Myself
from engine.dns import Resolver
from engine.log import Maillog
from engine.tls.client import PolicyFinder

Agent = Callable[[DeliveryRequest], Awaitable[DeliveryOutcome]]


def build_agents(config: Config, resolver: Resolver,
                 connections: ConnectionCache | None = None,
                 maillog: Maillog | None = None,
                 inject: local.Inject | None = None) -> dict[str, Agent]:
    """``inject`` (engine.cleanup.Cleanup.inject) lets local forward aliases and .forward
    entries that are not local as new messages."""
    myself = Myself(config)  # where this Tern takes mail: the SMTP client's loop check
    agents: dict[str, Agent] = {
        "smtp": functools.partial(smtp.deliver, config=config, resolver=resolver,
                                  connections=connections, maillog=maillog, myself=myself,
                                  finder=PolicyFinder(config)),
        "lmtp": functools.partial(lmtp.deliver, config=config, resolver=resolver),
        "local": functools.partial(local.deliver, config=config, inject=inject),
        "virtual": functools.partial(local.deliver, config=config, virtual=True),
        "error": functools.partial(trivial.error, config=config),
        "retry": functools.partial(trivial.retry, config=config),
        "discard": functools.partial(trivial.discard, config=config),
    }
    for name in config.transport:  # [transport.NAME]: SMTP with its own smtp_* settings
        own = config.for_transport(name)  # and its own TLS policy finder, made once here
        finder = agents["smtp"].keywords["finder"] if own is config else PolicyFinder(own)
        agents[name] = functools.partial(smtp.deliver, config=own, resolver=resolver,
                                         connections=connections, maillog=maillog,
                                         myself=myself, finder=finder)
    for name, transport in config.pipe_transports.items():
        agents[name] = functools.partial(pipe.deliver, config=config, name=name,
                                         transport=transport)
    return agents


def service_name(transport: str, config: Config) -> str:
    """The program name a delivery's log line carries, as Postfix's: a pipe transport logs as
    "pipe" (its name is in relay=), every other agent under its transport name."""
    return "pipe" if transport in config.pipe_transports else transport
