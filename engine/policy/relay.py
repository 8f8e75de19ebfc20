"""Who is trusted: permit_mynetworks's question (engine.policy.restrictions asks it once per
client address). Pure: the caller brings the client address and the configuration.
"""

import ipaddress

from engine.config import Config


def client_is_trusted(client_ip: str, config: Config) -> bool:
    """permit_mynetworks: is the client address inside one of mynetworks?"""
    return address_in(client_ip, config.mynetworks)


def address_in(client_ip: str, networks) -> bool:
    """Is the client address inside one of ``networks`` (an IPv4-mapped IPv6 address counts
    as its IPv4 address)? Any list with mynetworks' syntax: exclusions, exceptions."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
