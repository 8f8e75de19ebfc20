"""Tern's configuration: one TOML file whose keys keep Postfix's parameter names.

Trusts the administrator's file only after validation (engine.config.loader); the dataclasses
and their defaults are in engine.config.settings, the value parsers in engine.config.values.
"""

from engine.config.loader import ConfigError, load_config
from engine.config.settings import (
    LISTEN_SERVICES,
    Config,
    Listener,
    Network,
    default_myhostname,
    default_queue_directory,
)
from engine.config.values import (
    parse_dns_server,
    parse_duration,
    parse_nexthop,
    parse_transport_nexthop,
)

__all__ = [
    "LISTEN_SERVICES",
    "Config",
    "ConfigError",
    "Listener",
    "Network",
    "default_myhostname",
    "default_queue_directory",
    "load_config",
    "parse_dns_server",
    "parse_duration",
    "parse_nexthop",
    "parse_transport_nexthop",
]
