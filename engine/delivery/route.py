"""Routing: the next hop for a recipient domain, from transport_maps, relayhost or MX.

A pure function of the domain and the configuration (no DNS here: MX lookups happen in the
delivery agent). Trusts the configuration, which engine.config validated at load time.
"""

from engine.config import Config, parse_nexthop
from engine.delivery import NextHop

DEFAULT_TRANSPORT = "smtp"
DEFAULT_PORTS = {"smtp": 25, "lmtp": 24}


def transport_lookup(domain: str, transport_maps: dict[str, str]) -> str | None:
    """The transport_maps value for ``domain``, as Postfix's transport(5) searches: the domain
    itself, then ``.parent`` entries from the nearest parent up (they match subdomains only),
    then ``*``."""
    if domain in transport_maps:
        return transport_maps[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = "." + ".".join(labels[i:])
        if parent in transport_maps:
            return transport_maps[parent]
    return transport_maps.get("*")


def _nexthop(transport: str, nexthop: str, domain: str) -> NextHop:
    """``transport`` to ``nexthop`` (Postfix form; empty means the recipient domain, by MX)."""
    transport = transport or DEFAULT_TRANSPORT
    host, port, mx_lookup = parse_nexthop(nexthop)
    if not host:
        host, mx_lookup = domain, True
    return NextHop(transport, host, port or DEFAULT_PORTS.get(transport, 25), mx_lookup)


def nexthop_for(domain: str, config: Config) -> NextHop:
    """Where mail for ``domain`` goes: a transport_maps match, else relayhost, else the
    domain's MX hosts on port 25."""
    domain = domain.rstrip(".").lower()
    entry = transport_lookup(domain, config.transport_maps)
    if entry is not None:
        transport, _, nexthop = entry.partition(":")
        return _nexthop(transport, nexthop, domain)
    if config.relayhost:
        return _nexthop(DEFAULT_TRANSPORT, config.relayhost, domain)
    if domain.startswith("[") and domain.endswith("]"):  # user@[192.0.2.1]: no MX lookup
        return _nexthop(DEFAULT_TRANSPORT, domain, domain)
    return NextHop(DEFAULT_TRANSPORT, domain, 25, True)
