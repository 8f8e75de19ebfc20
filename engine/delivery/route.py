"""Routing: the next hop for a recipient domain: local, transport_maps, relayhost or MX.

A pure function of the domain and the configuration (no DNS here: MX lookups happen in the
delivery agent). Trusts the configuration, which engine.config validated at load time; the
domain comes from a client, so whatever it holds ends in a NextHop or a PermanentFailure.
"""

import dataclasses
import functools

from engine.config import Config, parse_transport_nexthop
from engine.delivery import NextHop, PermanentFailure, TransientFailure
from engine.ipliteral import parse_ip

DEFAULT_TRANSPORT = "smtp"
LOCAL_TRANSPORT = "local"
VIRTUAL_TRANSPORT = "virtual"
DEFAULT_PORTS = {"smtp": 25, "lmtp": 24}


def nexthop_as_written(hop: NextHop) -> str:
    """The next hop as relayhost or transport_maps write it (Postfix's lookup key in
    smtp_sasl_password_maps and smtp_tls_policy_maps): ``[host]`` without MX lookup,
    ``:port`` when it is not the transport's default."""
    host = hop.host if hop.mx_lookup else f"[{hop.host}]"
    default = DEFAULT_PORTS.get(hop.transport, 25)
    return host if hop.port in (default, 0) else f"{host}:{hop.port}"


# The same few next hops (relayhost, transport_maps values) are parsed for every message.
_parsed_nexthop = functools.lru_cache(maxsize=1024)(parse_transport_nexthop)


def transport_lookup(domain: str, transport_maps: dict[str, str]) -> str | None:
    """The transport_maps value for ``domain``, as Postfix's transport(5) searches: the domain
    itself, then ``.parent`` entries from the nearest parent up (they match subdomains only),
    then ``*``. An address literal has no parents."""
    if domain in transport_maps:
        return transport_maps[domain]
    labels = [] if domain.startswith("[") else domain.split(".")
    for i in range(1, len(labels)):
        parent = "." + ".".join(labels[i:])
        if parent in transport_maps:
            return transport_maps[parent]
    return transport_maps.get("*")


def _domain_hop(transport: str, domain: str, port: int) -> NextHop:
    """The recipient domain itself as next hop: its MX hosts, or for an address literal
    (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) that address with no MX lookup, as Postfix."""
    if domain.startswith("["):
        address = parse_ip(domain)
        if address is None:
            raise PermanentFailure("5.1.2", f"bad address literal in recipient domain {domain}")
        return NextHop(transport, str(address), port, False)
    if not domain:
        raise PermanentFailure("5.1.2", "empty recipient domain")
    return NextHop(transport, domain, port, True)


def _nexthop(transport: str, nexthop: str, domain: str, config: Config) -> NextHop:
    """``transport`` to ``nexthop`` (Postfix form; empty means the recipient domain, by MX).
    A ``[transport.NAME]`` transport speaks SMTP: its next hop is parsed as smtp's."""
    transport = transport or DEFAULT_TRANSPORT
    protocol = "smtp" if transport in config.transport else transport
    if protocol not in DEFAULT_PORTS:  # local, virtual, error, discard, pipe: free text
        return NextHop(transport, nexthop or domain, 0, False)
    default_port = DEFAULT_PORTS[protocol]
    try:
        host, port, mx_lookup = _parsed_nexthop(protocol, nexthop)
    except ValueError as exc:  # only a Config built without load_config can hold one: the
        # administrator's to fix, so it defers (Postfix: a configuration problem is 4.3.5)
        raise TransientFailure("4.3.5", f"bad next hop {nexthop!r} for {domain}: {exc}") from None
    if host.startswith("unix:"):  # lmtp:unix:/path
        return NextHop(transport, host, 0, False)
    if not host:
        return _domain_hop(transport, domain, port or default_port)
    return NextHop(transport, host, port or default_port, mx_lookup)


def _from_relayhost(hop: NextHop, setting: str) -> NextHop:
    """``hop``, marked as the relay host of ``setting`` (see NextHop.relayhost)."""
    return dataclasses.replace(hop, relayhost=setting)


def sender_transport(sender: str, maps: dict[str, str], null_key: str = "") -> str | None:
    """The sender_dependent_default_transport_maps (or _relayhost_maps) value for ``sender``:
    the address, then its "@domain" (Postfix's lookup order); for the null sender the entry
    under ``null_key`` (Postfix's empty_address_relayhost_maps_lookup_key), or None without
    one; None for no match."""
    if not maps:
        return None
    if not sender:
        return maps.get(null_key.lower()) if null_key else None
    sender = sender.lower()
    if sender in maps:
        return maps[sender]
    _, at, domain = sender.rpartition("@")
    return maps.get("@" + domain) if at else None


def nexthop_for(domain: str, config: Config, sender: str = "") -> NextHop:
    """Where mail for ``domain`` goes, in Postfix's order: a transport_maps match; else a local
    domain (``config.local_domains``) to the local transport; a virtual_mailbox_domains one
    to the virtual transport; else the default transport (``sender``'s
    sender_dependent_default_transport_maps entry, else smtp) to its own next hop, else to
    ``sender``'s sender_dependent_relayhost_maps entry, else to relayhost, else to the domain's
    MX hosts on port 25 (an address literal: that address, no MX lookup). Raises
    PermanentFailure (5.1.2) for a domain that cannot be routed; never for one the SMTP grammar
    accepted."""
    domain = domain.rstrip(".").lower()
    entry = transport_lookup(domain, config.transport_maps)
    if entry is not None:
        transport, _, nexthop = entry.partition(":")
        return _nexthop(transport, nexthop, domain, config)
    if domain in config.local_domains:
        return NextHop(LOCAL_TRANSPORT, domain, mx_lookup=False)
    if domain in config.virtual_domains:
        return NextHop(VIRTUAL_TRANSPORT, domain, mx_lookup=False)
    sender_relayhost = sender_transport(
        sender, config.sender_dependent_relayhost_maps,
        config.empty_address_relayhost_maps_lookup_key)
    relayhost = sender_relayhost or config.relayhost
    setting = "sender_dependent_relayhost_maps" if sender_relayhost else "relayhost"
    entry = sender_transport(sender, config.sender_dependent_default_transport_maps)
    if entry is not None:
        transport, _, nexthop = entry.partition(":")
        hop = _nexthop(transport, nexthop or relayhost, domain, config)
        return hop if nexthop or not relayhost else _from_relayhost(hop, setting)
    if relayhost:
        return _from_relayhost(_nexthop(DEFAULT_TRANSPORT, relayhost, domain, config), setting)
    return _domain_hop(DEFAULT_TRANSPORT, domain, DEFAULT_PORTS[DEFAULT_TRANSPORT])
