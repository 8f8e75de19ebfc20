"""Who is trusted and which domains are ours: the two facts relay control rests on.

permit_mynetworks and reject_unauth_destination (engine.policy.restrictions) ask these. Pure:
the caller brings the client address and the configuration.
"""

import ipaddress

from engine.config import Config


def client_is_trusted(client_ip: str, config: Config) -> bool:
    """permit_mynetworks: is the client address inside one of mynetworks?"""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in config.mynetworks)


def domain_is_ours(domain: str, config: Config) -> bool:
    """A local domain, or one we relay for (a listed domain matches its subdomains too,
    as Postfix's parent_domain_matches_subdomains default does for relay_domains)."""
    if domain in config.local_domains:
        return True
    return domain_is_relayed(domain, config)


def domain_is_relayed(domain: str, config: Config) -> bool:
    """One of relay_domains or a subdomain of one."""
    for relay in config.relay_domains:
        relay = relay.lower().lstrip(".")
        if domain == relay or domain.endswith("." + relay):
            return True
    return False
