"""DNS for delivery: MX hosts of a domain (RFC 5321 §5.1, RFC 7505) and addresses of a host.

Async, with dnspython's asyncio resolver. Trusts the configured resolvers' answers; a failure
becomes the delivery error that decides the retry (PermanentFailure bounces, TransientFailure
defers), with Postfix's wording so the log reads the same.
"""

import asyncio
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
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


def make_resolver(config: Config, *, dnssec: bool = False) -> dns.asyncresolver.Resolver:
    """A dnspython resolver for ``config.dns_servers`` ("ip" or "ip:port"; empty: the system's
    resolv.conf), as resolv(5) does: each query waits ``config.dns_timeout`` seconds for a
    server and every server is tried ``config.dns_attempts`` times; answers cached for their
    TTL. With ``dnssec`` every query carries DO (EDNS0) and AD (RFC 6840 §5.7), so that a
    validating resolver says in each answer's AD bit whether it validated it."""
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
    if dnssec:
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


@dataclass(frozen=True)
class Secured:
    """Host names or addresses, and whether every DNS answer they came from was validated
    (the AD bit of a validating resolver; False for an IP literal or without ``dnssec``)."""

    items: list[str]
    secure: bool


def _validated(answer: dns.resolver.Answer | dns.message.Message | None) -> bool:
    if answer is None:
        return False
    response = answer.response if isinstance(answer, dns.resolver.Answer) else answer
    return bool(response.flags & dns.flags.AD)


class MxHost(str):
    """An MX host name that remembers its preference: the SMTP client's loop check drops the
    hosts not better than itself (engine.delivery.smtp); everywhere else it is just the name."""

    preference: int

    def __new__(cls, name: str, preference: int) -> "MxHost":
        host = super().__new__(cls, name)
        host.preference = preference
        return host

    def __getnewargs__(self) -> tuple[str, int]:  # copy, deepcopy and pickle keep it whole
        return str(self), self.preference


class Resolver:
    """MX and address lookups (see ``make_resolver``). Answers are cached for their TTL
    (dnspython's cache, shared by every delivery through this resolver). Only DANE needs to
    know whether an answer was DNSSEC-validated: those lookups (``dnssec=True``) go through a
    second resolver asking for DO/AD, made on first use, so the ordinary path never pays for
    DNSSEC records."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._resolver = make_resolver(config)
        self._dnssec: dns.asyncresolver.Resolver | None = None
        self._preference = config.smtp_address_preference

    @property
    def dnssec(self) -> dns.asyncresolver.Resolver:
        """The DO/AD-asking resolver (for MX/A/AAAA under DANE, and TLSA)."""
        if self._dnssec is None:
            self._dnssec = make_resolver(self._config, dnssec=True)
        return self._dnssec

    async def _query(self, name: str, rtype: str, *, dnssec: bool = False,
                     nodata: list | None = None) -> dns.resolver.Answer | None:
        """The answer, or None when the name exists without records of that type (the
        response then goes to ``nodata``, for its AD bit). Raises PermanentFailure (5.1.2)
        for NXDOMAIN, TransientFailure (4.4.3) for SERVFAIL/timeout."""
        resolver = self.dnssec if dnssec else self._resolver
        try:
            return await resolver.resolve(name, rtype, search=False)
        except dns.resolver.NoAnswer as exc:
            if nodata is not None:
                nodata.append(exc.response())
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
        return (await self.mx_lookup(domain)).items

    async def mx_lookup(self, domain: str, *, dnssec: bool = False) -> Secured:
        """``mx_hosts``, and (with ``dnssec``) whether the MX answer (or, for an implicit MX,
        the answer saying there is none) was validated: RFC 7672 §2.2.1's "secure MX"."""
        literal = _ip_literal(domain)
        if literal:
            return Secured([literal], False)
        domain = domain.rstrip(".").lower()
        nodata: list = []
        answer = await self._query(domain, "MX", dnssec=dnssec, nodata=nodata)
        if answer is None:
            return Secured([domain], dnssec and _validated(nodata[0] if nodata else None))
        records = sorted(answer, key=lambda mx: (mx.preference, random.random()))
        hosts = [MxHost(mx.exchange.to_text(omit_final_dot=True).lower(), mx.preference)
                 for mx in records]
        hosts = list(dict.fromkeys(host for host in hosts if host not in ("", ".")))
        if not hosts:  # RFC 7505 §3: "0 ." says the domain accepts no mail
            raise PermanentFailure("5.1.10", f"Domain {domain} does not accept mail (nullMX)")
        return Secured(hosts, dnssec and _validated(answer))

    async def addresses(self, host: str) -> list[str]:
        """The addresses of ``host`` in ``smtp_address_preference`` order (Postfix): "ipv4" or
        "ipv6" first, else ("any") in random order; an IP literal is returned as is. Raises
        PermanentFailure (5.4.4) when the host has none (5.1.2 for a bad literal),
        TransientFailure (4.4.3) when DNS failed and no address was found."""
        return (await self.address_lookup(host)).items

    async def address_lookup(self, host: str, *, dnssec: bool = False) -> Secured:
        """``addresses``, and (with ``dnssec``) whether every A/AAAA answer that gave an
        address was validated (RFC 7672 §2.2.2: DANE only for a host with secure addresses)."""
        literal = _ip_literal(host)
        if literal:
            return Secured([literal], False)
        host = host.rstrip(".").lower()
        answers = await asyncio.gather(
            self._query(host, "A", dnssec=dnssec), self._query(host, "AAAA", dnssec=dnssec),
            return_exceptions=True,
        )
        used = [answer for answer in answers if isinstance(answer, dns.resolver.Answer)]
        found = [record.address for answer in used for record in answer]
        if found:
            return Secured(_ordered(list(dict.fromkeys(found)), self._preference),
                           dnssec and all(_validated(answer) for answer in used))
        for error in answers:
            if isinstance(error, TransientFailure):
                raise error
        for error in answers:
            if isinstance(error, BaseException) and not isinstance(error, PermanentFailure):
                raise error
        if isinstance(answers[0], PermanentFailure):
            raise PermanentFailure("5.4.4", answers[0].text)
        raise PermanentFailure("5.4.4", _name_error(host, "A", NO_DATA))
