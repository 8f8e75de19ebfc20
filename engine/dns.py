"""DNS for delivery: MX hosts of a domain (RFC 5321 §5.1, RFC 7505) and addresses of a host.

Async, with dnspython's asyncio resolver. Trusts the configured resolvers' answers; a failure
becomes the delivery error that decides the retry (PermanentFailure bounces, TransientFailure
defers), with Postfix's wording so the log reads the same.
"""

import asyncio
import random

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from engine.config import Config, parse_dns_server
from engine.delivery import PermanentFailure, TransientFailure
from engine.ipliteral import parse_ip

NOT_FOUND = "Host not found"
TRY_AGAIN = "Host not found, try again"
NO_DATA = "Host found but no data record of requested type"
MALFORMED = "Malformed domain name"
# dnspython's errors for a name that cannot be a DNS name (a label over 63 octets, a name over
# 255, an empty label, a bad escape or IDNA form); caught before DNSException, which defers
MALFORMED_NAME = (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
                  dns.name.BadEscape, dns.name.IDNAException)


def _name_error(name: str, rtype: str, why: str) -> str:
    return f"Host or domain name not found. Name service error for name={name} type={rtype}: {why}"


def _ip_literal(host: str) -> str | None:
    """``host`` as an IP address ("1.2.3.4", "[1.2.3.4]", "[IPv6:::1]"), or None for a name.
    Brackets around anything else are no host name: PermanentFailure (5.1.2), never a query."""
    address = parse_ip(host)
    if address is not None:
        return str(address)
    if host.startswith("["):
        raise PermanentFailure("5.1.2", f"bad address literal {host}")
    return None


def _ordered(addresses: list[str], preference: str) -> list[str]:
    """``addresses`` (IPv4 before IPv6, as found) in ``preference`` order."""
    if preference == "ipv4":
        return addresses
    if preference == "ipv6":
        return sorted(addresses, key=lambda address: ":" not in address)
    return random.sample(addresses, len(addresses))


class MxHost(str):
    """An MX host name that remembers its preference: the SMTP client's loop check drops the
    hosts not better than itself (engine.delivery.smtp); everywhere else it is just the name."""

    preference: int

    def __new__(cls, name: str, preference: int) -> "MxHost":
        host = super().__new__(cls, name)
        host.preference = preference
        return host


class Resolver:
    """MX and address lookups through ``config.dns_servers`` ("ip" or "ip:port"; empty: the
    system's resolv.conf), as resolv(5) does: each query waits ``config.dns_timeout`` seconds
    for a server and every server is tried ``config.dns_attempts`` times. Answers are cached
    for their TTL (dnspython's cache, shared by every delivery through this resolver)."""

    def __init__(self, config: Config) -> None:
        if config.dns_servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_dns_server(entry))
                for entry in config.dns_servers
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]  # as the C library does without resolv.conf
        resolver.timeout = config.dns_timeout
        resolver.lifetime = config.dns_timeout * config.dns_attempts * len(resolver.nameservers)
        resolver.cache = dns.resolver.LRUCache()
        self._resolver = resolver
        self._preference = config.smtp_address_preference

    async def _query(self, name: str, rtype: str) -> dns.resolver.Answer | None:
        """The answer, or None when the name exists without records of that type. Raises
        PermanentFailure (5.1.2) for NXDOMAIN, TransientFailure (4.4.3) for SERVFAIL/timeout."""
        try:
            return await self._resolver.resolve(name, rtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure("5.1.2", _name_error(name, rtype, NOT_FOUND)) from None
        except MALFORMED_NAME:  # no query can ever find it: bounce, never defer (Postfix)
            raise PermanentFailure("5.1.2", _name_error(name, rtype, MALFORMED)) from None
        except (dns.exception.DNSException, OSError):
            raise TransientFailure("4.4.3", _name_error(name, rtype, TRY_AGAIN)) from None

    async def mx_hosts(self, domain: str) -> list[str]:
        """The mail hosts of ``domain``, best preference first, random among equals (RFC 5321
        §5.1); the domain itself when it has no MX (implicit MX); an IP literal as is. Null MX
        (RFC 7505), NXDOMAIN and a bad literal raise PermanentFailure; SERVFAIL and timeouts
        raise TransientFailure."""
        literal = _ip_literal(domain)
        if literal:
            return [literal]
        domain = domain.rstrip(".").lower()
        answer = await self._query(domain, "MX")
        if answer is None:
            return [domain]
        records = sorted(answer, key=lambda mx: (mx.preference, random.random()))
        hosts = [MxHost(mx.exchange.to_text(omit_final_dot=True).lower(), mx.preference)
                 for mx in records]
        hosts = list(dict.fromkeys(host for host in hosts if host not in ("", ".")))
        if not hosts:  # RFC 7505 §3: "0 ." says the domain accepts no mail
            raise PermanentFailure("5.1.10", f"Domain {domain} does not accept mail (nullMX)")
        return hosts

    async def addresses(self, host: str) -> list[str]:
        """The addresses of ``host`` in ``smtp_address_preference`` order (Postfix): "ipv4" or
        "ipv6" first, else ("any") in random order; an IP literal is returned as is. Raises
        PermanentFailure (5.4.4) when the host has none (5.1.2 for a bad literal),
        TransientFailure (4.4.3) when DNS failed and no address was found."""
        literal = _ip_literal(host)
        if literal:
            return [literal]
        host = host.rstrip(".").lower()
        answers = await asyncio.gather(
            self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True
        )
        found = [
            record.address
            for answer in answers
            if isinstance(answer, dns.resolver.Answer)
            for record in answer
        ]
        if found:
            return _ordered(list(dict.fromkeys(found)), self._preference)
        for error in answers:
            if isinstance(error, TransientFailure):
                raise error
        for error in answers:
            if isinstance(error, BaseException) and not isinstance(error, PermanentFailure):
                raise error
        if isinstance(answers[0], PermanentFailure):
            raise PermanentFailure("5.4.4", answers[0].text)
        raise PermanentFailure("5.4.4", _name_error(host, "A", NO_DATA))
