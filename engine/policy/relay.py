"""Relay control: may this client send to this recipient? (Postfix's reject_unauth_destination)

A client in mynetworks may send anywhere; any other client only to relay_domains and the local
domains (mydestination). Pure: the caller brings the client address and the configuration.
"""

import ipaddress

from engine.config import Config
from engine.smtp.grammar import domain_of
from engine.smtp.replies import Reply, relay_denied


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


def domain_is_ours(domain: str, config: Config) -> bool:
    """A local domain, or one we relay for (a listed domain matches its subdomains too,
    as Postfix's parent_domain_matches_subdomains default does for relay_domains)."""
    local = config.local_domains
    if domain in local:
        return True
    for relay in config.relay_domains:
        relay = relay.lower().lstrip(".")
        if domain == relay or domain.endswith("." + relay):
            return True
    return False


def check_relay(client_ip: str, recipient: str, config: Config, *,
                trusted: bool | None = None) -> Reply | None:
    """None to permit, or the reply refusing the recipient. ``trusted``: the caller's
    client_is_trusted, when it keeps one per session (it does not change between RCPTs)."""
    if client_is_trusted(client_ip, config) if trusted is None else trusted:
        return None
    if "@" not in recipient or domain_is_ours(domain_of(recipient), config):
        return None  # a bare "postmaster" is local
    return relay_denied(recipient)


def check_local_recipient(recipient: str, config: Config) -> Reply | None:
    """Postfix's smtpd_reject_unlisted_recipient for local domains. Tern has no local delivery
    agent yet, so no local recipient is known: accepting one would queue mail that can never
    be delivered. None for a recipient outside the local domains."""
    if "@" in recipient and domain_of(recipient) not in config.local_domains:
        return None
    return Reply(550, f"5.1.1 <{recipient}>: Recipient address rejected: "
                      "User unknown in local recipient table")
