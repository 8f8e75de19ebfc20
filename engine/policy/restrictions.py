"""SMTP access restriction lists (Postfix's smtpd_*_restrictions), parsed once, evaluated per
command.

A list is compiled from its names once (``compile_list``; an unknown name is RestrictionError),
then evaluated left to right against the session's facts: a step answers PERMIT (the rest of
*this* list is skipped), a Reply (reject or defer: the command is refused), or None (DUNNO: the
next step). ``SessionChecks`` runs the lists of each stage in Postfix's order — client, helo,
sender, relay, recipient, then smtpd_reject_unlisted_recipient — at RCPT with
smtpd_delay_reject (else each at its own command) and data restrictions at DATA.

Lists without DNS restrictions evaluate synchronously (``decide``): the per-RCPT hot path
awaits nothing. Lists with reject_unknown_*_domain need ``decide_async`` and a resolver
(engine.dns.Resolver; imported by the caller, this module does no I/O of its own).
Trusts nothing in the facts (client input); trusts the configuration it was compiled from.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.delivery import split_local
from engine.delivery.aliases import alias_tables
from engine.ipliteral import parse_address_literal
from engine.policy.access import address_keys, client_keys, domain_keys, first_match, parse_result
from engine.policy.relay import client_is_trusted
from engine.smtp.replies import Reply
from engine.tables import Table, TableError, open_table

if TYPE_CHECKING:
    from engine.config import Config

# The lists, in Postfix's evaluation order.
LISTS = ("smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions",
         "smtpd_relay_restrictions", "smtpd_recipient_restrictions", "smtpd_data_restrictions")


class RestrictionError(ValueError):
    """A restriction list that cannot be compiled (unknown name, missing or bad table).
    ``token``: the name at fault, so the loader can point at its line."""

    def __init__(self, message: str, token: str = "") -> None:
        super().__init__(message)
        self.token = token


class _Permit:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PERMIT"


PERMIT = _Permit()  # a step's "OK": the rest of its list is skipped
Decision = Reply | _Permit | None  # None: DUNNO


@dataclass(slots=True)
class Facts:
    """What the restrictions may look at. ``sender`` None: no MAIL yet; "" is the null
    sender. ``recipient`` None: not a RCPT (nor a DATA with one recipient)."""

    client_ip: str
    client_name: str = "unknown"
    helo: str | None = None
    sender: str | None = None
    recipient: str | None = None
    sasl_username: str = ""
    trusted: bool = False  # the client is in mynetworks (SessionChecks fills it in)


# -- the facts' classes: what a generic reject names, and how ---------------------------------

_CLASS = {
    "client": "Client host", "helo": "Helo command", "sender": "Sender address",
    "recipient": "Recipient address", "data": "Data command",
}
_LIST_KIND = {
    "smtpd_client_restrictions": "client", "smtpd_helo_restrictions": "helo",
    "smtpd_sender_restrictions": "sender", "smtpd_relay_restrictions": "recipient",
    "smtpd_recipient_restrictions": "recipient", "smtpd_data_restrictions": "data",
}


def _name(kind: str, facts: Facts) -> str:
    """Postfix's reply_name: the thing refused, as it goes between the angle brackets."""
    if kind == "client":
        return f"{facts.client_name}[{facts.client_ip}]"
    if kind == "helo":
        return facts.helo or ""
    if kind == "sender":
        return facts.sender or ""
    if kind == "recipient":
        return facts.recipient or ""
    return "DATA"


def refuse(code: int, dsn: str, kind: str, facts: Facts, text: str) -> Reply:
    """``554 5.7.1 <name>: Client host rejected: text`` (Postfix's smtpd_check_reject)."""
    return Reply(code, f"{dsn} <{_name(kind, facts)}>: {_CLASS[kind]} rejected: {text}")


# -- address and name syntax ------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname: letters, digits, '-' and '_' in labels of at most 63; not
    all-numeric (a bare address is no host name)."""
    return (len(name) <= 255 and _HOSTNAME.fullmatch(name) is not None
            and not name.rstrip(".").rpartition(".")[2].isdigit())


def _literal_ok(name: str) -> bool:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``: valid address literal."""
    return parse_address_literal(name) is not None


def split_address(address: str) -> tuple[str, str, bool]:
    """``(local part, domain, routed)`` as Postfix's resolver sees an address: the domain after
    the last '@' (lower case, no trailing dot); the local part dequoted. ``routed``: sender-
    specified routing — a source route ``@a,@b:user@c``, or a local part holding '@', '%'
    (the percent hack) or '!' (a bang path, host!user) — whose real destination is elsewhere."""
    routed = False
    if address.startswith("@") and ":" in address:  # RFC 5321 A-d-l
        address = address.partition(":")[2]
        routed = True
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    if "@" in local or "%" in local or "!" in local:
        routed = True
    return local, domain.rstrip(".").lower(), routed


def _fqdn_address(address: str) -> bool:
    """user@domain.tld or user@[literal]: reject_non_fqdn_sender/recipient's test."""
    _, domain, _ = split_address(address)
    if domain.startswith("["):
        return True
    return "." in domain and _valid_hostname(domain)


CONFIG_ERROR = Reply(451, "4.3.5 Server configuration error")


# -- compiled steps ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One compiled restriction. ``run(facts)``; DNS steps have ``run_async(facts, resolver)``
    instead, and ``run`` is None."""

    name: str
    run: Callable[[Facts], Decision] | None
    run_async: Callable[[Facts, Any], Any] | None = None
    uses_recipient: bool = False


@dataclass(frozen=True, slots=True)
class RestrictionList:
    key: str  # "smtpd_recipient_restrictions"
    kind: str  # "client", "helo", "sender", "recipient", "data"
    steps: tuple[Step, ...]
    needs_dns: bool
    uses_recipient: bool  # a result depends on the recipient: never cached

    def check(self, facts: Facts) -> Decision:
        """Evaluate a list without DNS steps."""
        for step in self.steps:
            result = step.run(facts)
            if result is not None:
                return result
        return None

    async def check_async(self, facts: Facts, resolver: Any) -> Decision:
        for step in self.steps:
            if step.run is not None:
                result = step.run(facts)
            else:
                result = await step.run_async(facts, resolver)
            if result is not None:
                return result
        return None


class Policy:
    """The compiled restriction lists and the settings they read, from one Config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.local_domains = config.local_domains
        self.virtual_domains = config.virtual_domains
        self.virtual_mailboxes = (open_table(config.virtual_mailbox_maps)
                                  if config.virtual_mailbox_maps else None)
        try:  # Postfix's local_recipient_maps: passwd and $alias_maps
            self.aliases = alias_tables(tuple(config.alias_maps))
        except TableError:
            self.aliases = None  # unreadable: accept, and let the local agent defer
        self.relay_domains = tuple(d.lower().lstrip(".") for d in config.relay_domains)
        self.parent_style = "smtpd_access_maps" in config.parent_domain_matches_subdomains
        self.relay_parent_style = "relay_domains" in config.parent_domain_matches_subdomains
        self.delay_reject = config.smtpd_delay_reject
        self.reject_unlisted_recipient = config.smtpd_reject_unlisted_recipient
        self.lists = {key: compile_list(key, getattr(config, key), self) for key in LISTS}

    # the facts every restriction shares

    def is_local(self, domain: str) -> bool:
        return domain in self.local_domains or domain == ""

    def is_relayed(self, domain: str) -> bool:
        for relay in self.relay_domains:
            if domain == relay or (self.relay_parent_style and domain.endswith("." + relay)):
                return True
        return False

    def authorized_destination(self, recipient: str) -> bool:
        """permit_auth_destination: the resolved domain is ours (final or relayed) and the
        address holds no sender-specified routing (user@elsewhere@domain, user%elsewhere@domain,
        elsewhere!user@domain, @elsewhere:user@domain)."""
        _, domain, routed = split_address(recipient)
        if routed:
            return False
        return self.is_local(domain) or domain in self.virtual_domains or self.is_relayed(domain)

    def unlisted_recipient(self, facts: Facts) -> Reply | None:
        """reject_unlisted_recipient: a local domain's recipient must be a passwd user or an
        alias (Postfix's default local_recipient_maps), a virtual mailbox domain's must be in
        virtual_mailbox_maps (the address, else @domain). Relay domains have no
        relay_recipient_maps yet: every recipient there is listed."""
        recipient = facts.recipient
        if recipient is None:
            return None
        local, domain, _ = split_address(recipient)
        if self.is_local(domain):
            user = split_local(local, self.config.recipient_delimiter)[0].lower()
            try:
                pwd.getpwnam(user)
                return None
            except KeyError:
                if self.aliases is None or any(
                        table.get(key) is not None for table in self.aliases
                        for key in (local.lower(), user)):
                    return None
                code = self.config.unknown_local_recipient_reject_code
                return refuse(code, f"{code // 100}.1.1", "recipient", facts,
                              "User unknown in local recipient table")
        if domain in self.virtual_domains:
            table = self.virtual_mailboxes
            if table is not None and (table.remote or any(
                    table.get(key) is not None for key in (f"{local}@{domain}".lower(),
                                                           f"@{domain}"))):
                return None
            code = self.config.unknown_virtual_mailbox_reject_code
            return refuse(code, f"{code // 100}.1.1", "recipient", facts,
                          "User unknown in virtual mailbox table")
        return None


# -- the restrictions, by name ----------------------------------------------------------------

Builder = Callable[[Policy, str], Step]


def _generic(policy: Policy, kind: str, name: str) -> Step:
    config = policy.config
    if name == "permit":
        return Step(name, lambda facts: PERMIT)
    if name == "reject":
        code = config.reject_code
        return Step(name, lambda facts: refuse(code, f"{code // 100}.7.1", kind, facts,
                                               "Access denied"))
    code = config.defer_code  # defer
    return Step(name, lambda facts: refuse(code, f"{code // 100}.7.1", kind, facts,
                                           "Try again later"))


def _permit_mynetworks(policy: Policy, name: str) -> Step:
    return Step(name, lambda facts: PERMIT if facts.trusted else None)


def _permit_sasl_authenticated(policy: Policy, name: str) -> Step:
    return Step(name, lambda facts: PERMIT if facts.sasl_username else None)


def _reject_unauth_destination(policy: Policy, name: str) -> Step:
    code = policy.config.relay_domains_reject_code

    def run(facts: Facts) -> Decision:
        recipient = facts.recipient
        if recipient is None or policy.authorized_destination(recipient):
            return None
        return Reply(code, f"{code // 100}.7.1 <{recipient}>: Relay access denied")

    return Step(name, run, uses_recipient=True)


def _reject_non_fqdn_helo_hostname(policy: Policy, name: str) -> Step:
    code = policy.config.non_fqdn_reject_code

    def run(facts: Facts) -> Decision:
        helo = facts.helo
        if helo is None or helo.startswith("["):
            return None
        if "." in helo.rstrip(".") and _valid_hostname(helo):
            return None
        return refuse(code, f"{code // 100}.5.2", "helo", facts, "need fully-qualified hostname")

    return Step(name, run)


def _reject_invalid_helo_hostname(policy: Policy, name: str) -> Step:
    code = policy.config.invalid_hostname_reject_code

    def run(facts: Facts) -> Decision:
        helo = facts.helo
        if helo is None:
            return None
        if _literal_ok(helo) if helo.startswith("[") else _valid_hostname(helo):
            return None
        return refuse(code, f"{code // 100}.5.2", "helo", facts, "Invalid name")

    return Step(name, run)


def _non_fqdn_address(kind: str) -> Builder:
    def build(policy: Policy, name: str) -> Step:
        code = policy.config.non_fqdn_reject_code

        def run(facts: Facts) -> Decision:
            address = facts.sender if kind == "sender" else facts.recipient
            if not address or (kind == "recipient" and address.lower() == "postmaster"):
                return None
            if _fqdn_address(address):
                return None
            return refuse(code, f"{code // 100}.5.2", kind, facts,
                          "need fully-qualified address")

        return Step(name, run, uses_recipient=kind == "recipient")

    return build


def _unknown_domain(kind: str) -> Builder:
    """reject_unknown_sender_domain / reject_unknown_recipient_domain: the domain has no MX
    and no address record (NXDOMAIN or no data: unknown_address_reject_code, 4.1.8 / 4.1.2),
    or a null MX (RFC 7505: 550 5.7.27 sender, 556 5.1.10 recipient). A DNS failure defers
    (450) with the same text. Domains we are the final destination for are not looked up."""
    dsn_detail = "1.8" if kind == "sender" else "1.2"

    def build(policy: Policy, name: str) -> Step:
        code = policy.config.unknown_address_reject_code

        async def run_async(facts: Facts, resolver: Any) -> Decision:
            from engine.delivery import PermanentFailure, TransientFailure

            address = facts.sender if kind == "sender" else facts.recipient
            if not address:
                return None
            _, domain, _ = split_address(address)
            if not domain or domain.startswith("[") or policy.is_local(domain):
                return None
            try:
                hosts = await resolver.mx_hosts(domain)
                if hosts == [domain]:  # no MX: the domain's own address records
                    await resolver.addresses(domain)
            except PermanentFailure as failure:
                if failure.dsn == "5.1.10":  # null MX
                    if kind == "sender":
                        return refuse(550, "5.7.27", kind, facts,
                                      f"Domain {domain} does not accept mail (nullMX)")
                    return refuse(556, "5.1.10", kind, facts,
                                  f"Domain {domain} does not accept mail (nullMX)")
                return refuse(code, f"{code // 100}.{dsn_detail}", kind, facts,
                              "Domain not found")
            except TransientFailure:
                return refuse(450, f"4.{dsn_detail}", kind, facts, "Domain not found")
            return None

        return Step(name, None, run_async, uses_recipient=kind == "recipient")

    return build


def _reject_unknown_helo_hostname(policy: Policy, name: str) -> Step:
    """The HELO name has no address and no MX record (unknown_hostname_reject_code, 450
    4.7.1 Host not found); a DNS failure defers (450). Address literals are not looked up."""
    code = policy.config.unknown_hostname_reject_code

    async def run_async(facts: Facts, resolver: Any) -> Decision:
        from engine.delivery import PermanentFailure, TransientFailure

        helo = facts.helo
        if not helo or helo.startswith("[") or not _valid_hostname(helo):
            return None
        try:
            await resolver.addresses(helo)
            return None
        except PermanentFailure:
            pass
        except TransientFailure:
            return refuse(450, "4.7.1", "helo", facts, "Host not found")
        try:
            hosts = await resolver.mx_hosts(helo)
        except PermanentFailure:
            return refuse(code, f"{code // 100}.7.1", "helo", facts, "Host not found")
        except TransientFailure:
            return refuse(450, "4.7.1", "helo", facts, "Host not found")
        if hosts == [helo.rstrip(".").lower()]:  # no MX either (and no address, above)
            return refuse(code, f"{code // 100}.7.1", "helo", facts, "Host not found")
        return None

    return Step(name, None, run_async)


def _reject_unlisted_recipient(policy: Policy, name: str) -> Step:
    return Step(name, policy.unlisted_recipient, uses_recipient=True)


def _access_result(value: str, kind: str, facts: Facts, policy: Policy) -> Decision:
    """A table's result as this list's decision (engine.policy.access.parse_result). An
    action Tern does not implement (HOLD, FILTER, …) defers the command (451 4.3.5) rather
    than let it pass unchecked."""
    config = policy.config
    result = parse_result(value, config.access_map_reject_code, config.access_map_defer_code)
    if result is None:
        return CONFIG_ERROR
    if result == "permit":
        return PERMIT
    if result == "dunno":
        return None
    code, dsn, text = result
    return refuse(code, dsn, kind, facts, text)


def _check_access(kind: str) -> Callable[[Policy, str, Table], Step]:
    """check_client_access / check_helo_access / check_sender_access / check_recipient_access:
    the first key (access(5) order) the table knows decides; the reply names that fact."""

    def build(policy: Policy, name: str, table: Table) -> Step:
        parent = policy.parent_style
        null_key = policy.config.smtpd_null_access_lookup_key

        def run(facts: Facts) -> Decision:
            if kind == "client":
                keys = client_keys(facts.client_name, facts.client_ip, parent)
            elif kind == "helo":
                if not facts.helo:
                    return None
                helo = facts.helo.lower()
                keys = [helo] if helo.startswith("[") else domain_keys(helo.rstrip("."), parent)
            else:
                address = facts.sender if kind == "sender" else facts.recipient
                if address is None:
                    return None
                keys = address_keys(address, parent, null_key)
            value = first_match(table, keys)
            return None if value is None else _access_result(value, kind, facts, policy)

        return Step(f"{name} {table.spec}", run, uses_recipient=kind == "recipient")

    return build


SIMPLE: dict[str, Builder] = {
    "permit_mynetworks": _permit_mynetworks,
    "permit_sasl_authenticated": _permit_sasl_authenticated,
    "reject_unauth_destination": _reject_unauth_destination,
    "reject_non_fqdn_helo_hostname": _reject_non_fqdn_helo_hostname,
    "reject_invalid_helo_hostname": _reject_invalid_helo_hostname,
    "reject_non_fqdn_sender": _non_fqdn_address("sender"),
    "reject_non_fqdn_recipient": _non_fqdn_address("recipient"),
    "reject_unknown_sender_domain": _unknown_domain("sender"),
    "reject_unknown_recipient_domain": _unknown_domain("recipient"),
    "reject_unknown_helo_hostname": _reject_unknown_helo_hostname,
    "reject_unlisted_recipient": _reject_unlisted_recipient,
}
GENERIC = ("permit", "reject", "defer")
ACCESS = {
    "check_client_access": _check_access("client"),
    "check_helo_access": _check_access("helo"),
    "check_sender_access": _check_access("sender"),
    "check_recipient_access": _check_access("recipient"),
}
# Postfix's pre-2.x names, still accepted by Postfix (postconf(5))
ALIASES = {"reject_invalid_hostname": "reject_invalid_helo_hostname",
           "reject_non_fqdn_hostname": "reject_non_fqdn_helo_hostname",
           "reject_unknown_hostname": "reject_unknown_helo_hostname"}
KNOWN = frozenset(SIMPLE) | frozenset(GENERIC) | frozenset(ACCESS) | frozenset(ALIASES)


def tokenize(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A Postfix list value → its names: split on commas and whitespace, except inside
    ``{ … }`` (an inline: table). An array's entries are tokenized each."""
    if not isinstance(value, str):
        return tuple(token for entry in value for token in tokenize(entry))
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth <= 0 and (char == "," or char.isspace()):
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if depth:
        raise RestrictionError(f'unbalanced "{{" in "{value}"')
    if current:
        tokens.append("".join(current))
    return tuple(tokens)


def compile_list(key: str, tokens: tuple[str, ...], policy: Policy) -> RestrictionList:
    """The steps of list ``key``. Raises RestrictionError for an unknown name, a check_*_access
    without its table, or a table that cannot be opened."""
    kind = _LIST_KIND[key]
    steps: list[Step] = []
    items = iter(tokens)
    for token in items:
        name = ALIASES.get(token.lower(), token.lower())
        if name in GENERIC:
            steps.append(_generic(policy, kind, name))
        elif name in SIMPLE:
            steps.append(SIMPLE[name](policy, name))
        elif name in ACCESS:
            spec = next(items, None)
            if spec is None or ":" not in spec:
                raise RestrictionError(f'"{token}" needs a table, e.g. '
                                       f'"{token} texthash:/etc/tern/access"', token)
            try:
                table = open_table(spec)
            except TableError as error:
                raise RestrictionError(f'"{token} {spec}": {error}', spec) from None
            if table.remote:
                raise RestrictionError(f'"{token} {spec}": remote tables are not supported '
                                       "in restrictions yet")
            steps.append(ACCESS[name](policy, name, table))
        else:
            raise RestrictionError(f'unknown restriction "{token}"', token)
    return RestrictionList(
        key=key, kind=kind, steps=tuple(steps),
        needs_dns=any(step.run is None for step in steps),
        uses_recipient=any(step.uses_recipient for step in steps))


def validate(key: str, value: Any) -> tuple[str, ...]:
    """For the configuration loader: ``value``'s tokens, after checking every name and
    opening every table (RestrictionError otherwise)."""
    tokens = tokenize(value)
    items = iter(tokens)
    for token in items:
        name = ALIASES.get(token.lower(), token.lower())
        if name not in KNOWN:
            raise RestrictionError(f'unknown restriction "{token}"', token)
        if name in ACCESS:
            spec = next(items, None)
            if spec is None or ":" not in spec:
                raise RestrictionError(f'"{token}" needs a table, e.g. '
                                       f'"{token} texthash:/etc/tern/access"', token)
            try:
                open_table(spec)
            except TableError as error:
                raise RestrictionError(f'"{token} {spec}": {error}', spec) from None
    return tokens


# Postfix refuses to start without one of these in the relay or recipient list (open relay).
RELAY_GUARDS = frozenset({"reject_unauth_destination", "reject", "defer"})


# -- per session ------------------------------------------------------------------------------

# Which lists each command evaluates; with smtpd_delay_reject the early ones wait for RCPT.
_EARLY = {"HELO": LISTS[:2], "MAIL": LISTS[:3]}
_RCPT = LISTS[:5]
_DATA = LISTS[5:]


class SessionChecks:
    """The restriction state of one SMTP session: a cache of the client, helo and sender lists'
    verdicts (re-evaluated when a fact they read changes: a new client identity from PROXY or
    XCLIENT, HELO, MAIL) and the mynetworks answer for the current client address."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._trusted_ip: str | None = None
        self._trusted = False
        self._cache: dict[str, tuple[tuple, Decision]] = {}
        lists = policy.lists

        def plan(keys: tuple[str, ...]) -> tuple[RestrictionList, ...]:
            return tuple(lists[key] for key in keys if lists[key].steps)

        self._plans = {"RCPT": plan(_RCPT), "DATA": plan(_DATA)}
        for stage, keys in _EARLY.items():
            self._plans[stage] = () if policy.delay_reject else plan(keys)
        self._dns = {stage: any(r.needs_dns for r in rlists)
                     for stage, rlists in self._plans.items()}

    def forget_client(self) -> None:
        """The client identity changed (PROXY, XCLIENT): recompute trust and verdicts."""
        self._trusted_ip = None
        self._cache.clear()

    def needs_dns(self, stage: str) -> bool:
        """Whether ``stage`` ("HELO", "MAIL", "RCPT", "DATA") must use ``decide_async``."""
        return self._dns[stage]

    def _prepare(self, facts: Facts) -> None:
        if facts.client_ip != self._trusted_ip:
            self._trusted_ip = facts.client_ip
            self._trusted = client_is_trusted(facts.client_ip, self.policy.config)
        facts.trusted = self._trusted

    def _cached(self, rlist: RestrictionList, facts: Facts) -> tuple[tuple | None, Any]:
        if rlist.uses_recipient or rlist.kind in ("recipient", "data"):
            return None, None
        key = (facts.client_ip, facts.client_name, facts.sasl_username, facts.helo,
               facts.sender)
        hit = self._cache.get(rlist.key)
        if hit is not None and hit[0] == key:
            return key, hit
        return key, None

    def decide(self, stage: str, facts: Facts) -> Reply | None:
        """The refusal for this command, or None to accept (lists without DNS steps)."""
        self._prepare(facts)
        for rlist in self._plans[stage]:
            key, hit = self._cached(rlist, facts)
            if hit is not None:
                result = hit[1]
            else:
                result = rlist.check(facts)
                if key is not None:
                    self._cache[rlist.key] = (key, result)
            if isinstance(result, Reply):
                return result
        return self._finish(stage, facts)

    async def decide_async(self, stage: str, facts: Facts, resolver: Any) -> Reply | None:
        """As ``decide``, awaiting the DNS restrictions with ``resolver`` (engine.dns)."""
        self._prepare(facts)
        for rlist in self._plans[stage]:
            key, hit = self._cached(rlist, facts)
            if hit is not None:
                result = hit[1]
            else:
                result = await rlist.check_async(facts, resolver)
                if key is not None:
                    self._cache[rlist.key] = (key, result)
            if isinstance(result, Reply):
                return result
        return self._finish(stage, facts)

    def _finish(self, stage: str, facts: Facts) -> Reply | None:
        """smtpd_reject_unlisted_recipient: after the lists, for a recipient not refused."""
        if stage == "RCPT" and self.policy.reject_unlisted_recipient:
            return self.policy.unlisted_recipient(facts)
        return None
