"""Loading: the TOML file read, each raw value converted to its Config field, and checked.

Trusts nothing in the administrator's file: an unknown key, a bad value or a TOML syntax error
stops start-up with one ConfigError naming the file, the line (where known) and the key.
"""

import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import settings
from engine.config.keylines import _key_lines, _line_of, _toml_key
from engine.config.settings import KEY_ALIASES, Config, Listener, Network, PipeTransport
from engine.config.values import (
    _is_hostname,
    _parse_listen_address,
    _show,
    parse_dns_server,
    parse_duration,
    parse_nexthop,
    parse_transport_nexthop,
)
from engine.ipliteral import parse_address_literal
from engine.tables import TableError, open_table
from engine.tls import policy as tls_policy
from engine.tls.protocols import parse_protocols


class ConfigError(Exception):
    """A configuration file that cannot be used. ``str()`` is one message naming the file, the
    line where known and the key, e.g. ``tern.toml:7: message_size_limit: expected ...``."""

    def __init__(
        self, message: str, *, file: str = "", line: int | None = None, key: str | None = None
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        where = f"{file}:{line}" if file and line else file
        super().__init__(f"{where}: {message}" if where else message)


class _Invalid(ValueError):
    """A bad value, raised by the converters below; load_config turns it into a ConfigError.

    ``sub`` is the path below the top-level key (a table key, or a [[listen]] index and key),
    ``label`` the key as the message names it, ``entry`` a list entry to find the line of, and
    ``bare`` means the message is complete without the ``label: `` prefix."""

    def __init__(
        self,
        message: str,
        *,
        sub: tuple[Any, ...] = (),
        label: str | None = None,
        entry: str | None = None,
        bare: bool = False,
    ) -> None:
        super().__init__(message)
        self.sub = sub
        self.label = label
        self.entry = entry
        self.bare = bare


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


# -- converters: raw TOML value -> field value, or _Invalid ---------------------------------------

Converter = Callable[[Any], Any]
_TRANSPORT = re.compile(r"[A-Za-z0-9-]+")


def _string(value: Any, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _Invalid(f"control characters are not allowed, got {_show(value)}")
    if not empty and not value.strip():
        raise _Invalid("expected a non-empty string")
    return value


def _hostname(value: Any) -> str:
    text = _string(value)
    if not _is_hostname(text):
        raise _Invalid(f"expected a host name such as mx1.example.com, got {_show(value)}")
    return text.lower()


def _optional_hostname(value: Any) -> str:
    return "" if value == "" else _hostname(value)


def _domain(value: str) -> str:
    """A mydestination/relay_domains entry: a domain, or $myhostname / $mydomain."""
    if value in ("$myhostname", "$mydomain"):
        return value
    if not _is_hostname(value):
        raise ValueError("expected a domain name, $myhostname or $mydomain")
    return value.lower()


def _network(value: str) -> Network:
    text = value
    m = re.fullmatch(r"\[([^\[\]]*)\](/.*)?", value)  # Postfix's "[2001:db8::]/32" form
    if m:
        text = m.group(1) + (m.group(2) or "")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("expected an address or address/prefix, e.g. 192.0.2.0/24") from None


def _client_networks(value: Any) -> tuple[Network, ...] | None:
    """A list of networks as mynetworks, or "$mynetworks" (kept as None: follows mynetworks)."""
    if value == "$mynetworks" or value == ["$mynetworks"]:
        return None
    return _str_list(_network, "networks")(value)


def _bare_newline(value: Any) -> str:
    """smtpd_forbid_bare_newline: Postfix's values but "no", which would let a bare LF end
    DATA (SMTP smuggling); "yes" is Postfix's alias for "normalize"."""
    text = _string(value).lower()
    if text == "yes":
        return "normalize"
    if text not in ("normalize", "reject"):
        raise _Invalid(f'expected "normalize" (or "yes") or "reject", got {_show(value)}')
    return text


def _dns_server(value: str) -> str:
    parse_dns_server(value)
    return value


def _helo_name(value: Any) -> str:
    text = _string(value, empty=False)
    if "$" in text:
        if text not in ("$myhostname", "$mydomain"):
            raise _Invalid(f"expected a host name, $myhostname or $mydomain, got {_show(value)}")
        return text
    if parse_address_literal(text) is not None:  # RFC 5321 §4.1.1.1: EHLO [addr]
        return text
    if not _is_hostname(text):
        raise _Invalid(
            f"expected a host name or address literal ([192.0.2.1], [IPv6:2001:db8::1]), "
            f"got {_show(value)}"
        )
    return text


def _relayhost(value: Any) -> str:
    text = _string(value)
    try:
        parse_nexthop(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _path(value: Any) -> Path:
    text = _string(value, empty=False)
    path = Path(text)
    if not path.is_absolute():
        raise _Invalid(f"expected an absolute path, got {_show(value)}")
    return path


def _optional_path(value: Any) -> str:
    """"" (none), or an absolute path."""
    return "" if value == "" else str(_path(value))


def _str_list(entry: Callable[[str], Any], what: str) -> Converter:
    """An array of strings, or one string holding entries separated by commas and/or spaces
    (Postfix's list syntax). ``entry`` converts one entry, raising ValueError."""

    def convert(value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):
            items = [item for item in re.split(r"[\s,]+", value) if item]
        elif isinstance(value, list):
            items = value
        else:
            raise _Invalid(f"expected an array of {what} (or one string), got {_show(value)}")
        out = []
        for item in items:
            if not isinstance(item, str):
                raise _Invalid(f"expected an array of {what}, got an entry {_show(item)}")
            try:
                out.append(entry(_string(item, empty=False).strip()))
            except ValueError as exc:
                raise _Invalid(f"bad entry {_show(item)}: {exc}", entry=item) from None
        return tuple(out)

    return convert


def _int(what: str, minimum: int = 1) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected {what}, got {_show(value)}")
        if value < minimum:
            raise _Invalid(f"expected {what} of at least {minimum}, got {value}")
        return value

    return convert


def _duration(*, allow_zero: bool) -> Converter:
    def convert(value: Any) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if seconds == 0 and not allow_zero:
            raise _Invalid(f"expected a duration greater than 0, got {_show(value)}")
        return seconds

    return convert


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Invalid(f"expected a number, got {_show(value)}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _transport_target(target: Any, where: dict[str, Any]) -> None:
    """A transport_maps-style value: ``"transport:nexthop"`` (the next hop may be empty)."""
    if not isinstance(target, str):
        raise _Invalid(f'expected "transport:nexthop", got {_show(target)}', **where)
    transport, colon, nexthop = target.partition(":")
    if not colon:
        raise _Invalid(f'expected "transport:nexthop", got {_show(target)}', **where)
    if not _TRANSPORT.fullmatch(transport):
        raise _Invalid(
            f"bad transport name {_show(transport)} (letters, digits and -) in {_show(target)}",
            **where,
        )
    try:
        parse_transport_nexthop(transport, nexthop)
    except ValueError as exc:
        raise _Invalid(f"bad next hop: {exc}", **where) from None


def _sender_transport_maps(value: Any) -> dict[str, str]:
    """``[sender_dependent_default_transport_maps]``: a sender address ("user@domain") or
    "@domain" -> ``"transport:nexthop"``, as Postfix's; keys ignore case."""
    name = "sender_dependent_default_transport_maps"
    if not isinstance(value, dict):
        raise _Invalid(f'expected a table of sender = "transport:nexthop", got {_show(value)}')
    out: dict[str, str] = {}
    for sender, target in value.items():
        where = {"sub": (sender,), "label": f"{name}.{_toml_key(sender)}"}
        local, at, domain = sender.rpartition("@")
        if not at or not _is_hostname(domain) or any(c in local for c in " <>@\"\r\n"):
            raise _Invalid(f'expected "user@domain" or "@domain", got {_show(sender)}', **where)
        _transport_target(target, where)
        out[sender.lower()] = target
    return out


def _transport_tables(value: Any) -> dict[str, dict[str, Any]]:
    """``[transport.NAME]`` tables: an SMTP transport of its own, with smtp_* settings (each
    checked as the main one) that override the main ones for it."""
    if not isinstance(value, dict):
        raise _Invalid(f"expected [transport.NAME] tables, got {_show(value)}")
    out: dict[str, dict[str, Any]] = {}
    for name, table in value.items():
        where = {"sub": (name,), "label": f"transport.{_toml_key(name)}"}
        if not _TRANSPORT.fullmatch(name):
            raise _Invalid(f"bad transport name {_show(name)} (letters, digits and -)", **where)
        if not isinstance(table, dict):
            raise _Invalid(f"expected a table of smtp_* settings, got {_show(table)}", **where)
        settings_of: dict[str, Any] = {}
        for key, raw in table.items():
            label = f"transport.{_toml_key(name)}.{_toml_key(key)}"
            if not key.startswith("smtp_") or key not in _CONVERTERS:
                raise _Invalid(f'unknown key "{_toml_key(key)}" (an smtp_* setting)',
                               sub=(name, key), label=label)
            try:
                settings_of[key] = _CONVERTERS[key](raw)
            except _Invalid as exc:
                raise _Invalid(str(exc), sub=(name, key, *exc.sub), label=label) from None
        out[name] = settings_of
    return out


def _bind_address(version: int) -> Converter:
    def convert(value: Any) -> str:
        text = _string(value)
        if not text:
            return ""
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise _Invalid(f"expected an IPv{version} address, got {_show(value)}")
        return str(address)

    return convert


def _transport_maps(value: Any) -> dict[str, str]:
    """``[transport_maps]``: domain (or ``.domain`` for its subdomains, or ``*``) ->
    ``"transport:nexthop"``, as in Postfix's transport(5)."""
    if not isinstance(value, dict):
        raise _Invalid(f'expected a table of domain = "transport:nexthop", got {_show(value)}')
    out: dict[str, str] = {}
    for domain, target in value.items():
        label = f"transport_maps.{_toml_key(domain)}"
        where = {"sub": (domain,), "label": label}
        pattern = domain[1:] if domain.startswith(".") else domain
        if domain != "*" and not _is_hostname(pattern):
            raise _Invalid(f"expected a domain, .domain or *, got {_show(domain)}", **where)
        _transport_target(target, where)
        if domain.lower() in out:
            raise _Invalid(f"{_show(domain)} is listed twice (domains ignore case)", **where)
        out[domain.lower()] = target
    return out


def _choice(*allowed: str) -> Converter:
    def convert(value: Any) -> str:
        text = _string(value)
        if text not in allowed:
            names = ", ".join(_show(name) for name in allowed)
            raise _Invalid(f"expected one of {names}, got {_show(value)}")
        return text

    return convert


def _tls_security_level(value: Any) -> str:
    text = _string(value)
    if text not in settings.TLS_SECURITY_LEVELS:
        allowed = ", ".join(_show(level) for level in settings.TLS_SECURITY_LEVELS)
        raise _Invalid(f"expected one of {allowed}, got {_show(value)}")
    return text


def _smtp_tls_level(value: Any) -> str:
    text = _string(value)
    if text and text not in tls_policy.LEVELS:
        allowed = ", ".join(_show(level) for level in tls_policy.LEVELS)
        raise _Invalid(f"expected one of {allowed}, got {_show(value)}")
    return text


def _opened_table(value: Any) -> str:
    """"" (none) or a lookup table "type:name" that opens now (a missing or malformed file
    stops start-up rather than the first delivery; in smtp_tls_policy_maps an entry Tern
    cannot apply defers its deliveries, so a typo never weakens TLS)."""
    text = _string(value)
    if text:
        try:
            open_table(text)
        except TableError as exc:
            raise _Invalid(str(exc)) from None
    return text


def _sasl_mechanism(value: str) -> str:
    """A SASL mechanism name (RFC 4422 §3.1: 1-20 of A-Z, 0-9, "-", "_"), upper-cased."""
    name = value.upper()
    if not re.fullmatch(r"[A-Z0-9_-]{1,20}", name):
        raise ValueError("expected a SASL mechanism name such as plain or login")
    return name


def _sasl_mechanism_filter(value: Any) -> tuple[str, ...]:
    """smtp_sasl_mechanism_filter: mechanism names; at least one that Tern's client speaks
    (PLAIN, LOGIN), else no AUTH could ever be made."""
    from engine.smtp.sasl_client import MECHANISMS

    names = _str_list(_sasl_mechanism, "SASL mechanism names")(value)
    if names and not set(names) & set(MECHANISMS):
        raise _Invalid(f"lets none of Tern's mechanisms through ({', '.join(MECHANISMS)}), "
                       f"got {_show(value)}")
    return names


def _sasl_option(value: str) -> str:
    from engine.smtp.sasl_client import SECURITY_OPTIONS

    option = value.lower()
    if option not in SECURITY_OPTIONS:
        raise ValueError(f"expected one of {', '.join(sorted(SECURITY_OPTIONS))}")
    return option


def _sender_relayhost_maps(value: Any) -> dict[str, str]:
    """``[sender_dependent_relayhost_maps]``: a sender address ("user@domain"), "@domain", or
    the null sender's lookup key ("<>") -> a relayhost (``[host]:port``…), as Postfix's;
    keys ignore case."""
    name = "sender_dependent_relayhost_maps"
    if not isinstance(value, dict):
        raise _Invalid(f'expected a table of sender = "[host]:port", got {_show(value)}')
    out: dict[str, str] = {}
    for sender, target in value.items():
        where = {"sub": (sender,), "label": f"{name}.{_toml_key(sender)}"}
        local, at, domain = sender.rpartition("@")
        if (at and (not _is_hostname(domain) or any(c in local for c in " <>@\"\r\n"))) or (
                not at and (not sender or any(c.isspace() for c in sender))):
            raise _Invalid(f'expected "user@domain", "@domain" or "<>", got {_show(sender)}',
                           **where)
        if not isinstance(target, str) or not target:
            raise _Invalid(f'expected a relay host such as "[relay.example]:587", '
                           f"got {_show(target)}", **where)
        try:
            parse_nexthop(target)
        except ValueError as exc:
            raise _Invalid(f"bad relay host: {exc}", **where) from None
        out[sender.lower()] = target
    return out


def _digest(value: Any) -> str:
    text = _string(value).lower()
    if text not in ("sha1", "sha256", "sha512"):
        raise _Invalid(f'expected "sha1", "sha256" or "sha512", got {_show(value)}')
    return text


def _tls_protocols(value: Any) -> str:
    text = _string(value)
    try:
        parse_protocols(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _sni_maps(value: Any) -> dict[str, str]:
    """``[tls_server_sni_maps]``: SNI domain (or ``.domain`` for its subdomains) -> the PEM file
    holding that domain's private key and certificate chain, as Postfix's table."""
    if not isinstance(value, dict):
        raise _Invalid(f'expected a table of domain = "/path/to/key-and-chain.pem", '
                       f"got {_show(value)}")
    out: dict[str, str] = {}
    for domain, pem in value.items():
        where = {"sub": (domain,), "label": f"tls_server_sni_maps.{_toml_key(domain)}"}
        if not _is_hostname(domain[1:] if domain.startswith(".") else domain):
            raise _Invalid(f"expected a domain or .domain, got {_show(domain)}", **where)
        if not isinstance(pem, str) or not Path(pem).is_absolute():
            raise _Invalid(f"expected the absolute path of a PEM file, got {_show(pem)}",
                           **where)
        if domain.lower() in out:
            raise _Invalid(f"{_show(domain)} is listed twice (domains ignore case)", **where)
        out[domain.lower()] = pem
    return out
def _restrictions(key: str) -> Converter:
    """A restriction list (engine.policy.restrictions): Postfix's "name, name table, …" string
    or an array; every name known, every check_*_access table opened (read) now."""

    def convert(value: Any) -> tuple[str, ...]:
        from engine.policy.restrictions import RestrictionError, validate

        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise _Invalid(f"expected an array of restriction names, got {_show(value)}")
            entries = [_string(item) for item in value]
        elif isinstance(value, str):
            entries = [_string(value)]
        else:
            raise _Invalid(f"expected a list of restrictions, got {_show(value)}")
        try:
            return validate(key, entries)
        except RestrictionError as exc:
            entry = next((item for item in entries if exc.token and exc.token in item), None)
            raise _Invalid(str(exc), entry=entry) from None

    return convert


def _reply_code(first: str) -> Converter:
    """A reply code: three digits starting with one of ``first`` ("45": 4xx or 5xx)."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not (
                100 <= value <= 599 and str(value)[0] in first):
            kinds = " or ".join(f"{digit}xx" for digit in first)
            raise _Invalid(f"expected a {kinds} reply code, got {_show(value)}")
        return value

    return convert


_LISTEN_KEYS = ("address", "service", "proxy_protocol")


def _listen(value: Any) -> tuple[Listener, ...]:
    """The ``[[listen]]`` array of tables: ``address = "host:port"``, ``service = "smtp"``,
    ``proxy_protocol = true`` (a PROXY v1/v2 header precedes SMTP)."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _Invalid(f'expected [[listen]] tables with address = "host:port", got {_show(value)}')
    if not value:
        raise _Invalid("expected at least one [[listen]] table")
    out: list[Listener] = []
    seen: dict[tuple[str, int], int] = {}
    for index, table in enumerate(value):
        for key in table:
            if key not in _LISTEN_KEYS:
                raise _Invalid(
                    f'unknown key "listen.{key}"{_suggest(key, _LISTEN_KEYS)}',
                    sub=(index, key),
                    label=f"listen.{key}",
                    bare=True,
                )
        if "address" not in table:
            raise _Invalid('missing "address"', sub=(index,))
        try:
            host, port = _parse_listen_address(table["address"])
        except ValueError as exc:
            raise _Invalid(str(exc), sub=(index, "address"), label="listen.address") from None
        service = table.get("service", "smtp")
        if service not in settings.LISTEN_SERVICES:
            allowed = ", ".join(_show(s) for s in sorted(settings.LISTEN_SERVICES))
            raise _Invalid(
                f"expected one of {allowed}, got {_show(service)}",
                sub=(index, "service"),
                label="listen.service",
            )
        if port and (host, port) in seen:
            raise _Invalid(
                f"{_show(table['address'])} is already in [[listen]] #{seen[host, port] + 1}",
                sub=(index, "address"),
                label="listen.address",
            )
        seen[host, port] = index
        try:
            proxy_protocol = _bool(table.get("proxy_protocol", False))
        except _Invalid as exc:
            raise _Invalid(str(exc), sub=(index, "proxy_protocol"),
                           label="listen.proxy_protocol") from None
        out.append(Listener(host=host, port=port, service=service, proxy_protocol=proxy_protocol))
    return tuple(out)


_PIPE_KEYS = ("argv", "user", "time_limit", "flags")


def _pipe_transports(value: Any) -> dict[str, PipeTransport]:
    """``[pipe_transports.NAME]`` tables, Postfix's master.cf pipe(8) entries: ``argv`` (the
    command and its arguments, with ${sender} ${recipient}… macros), ``user`` (who runs it:
    never root, as Postfix), ``time_limit`` (seconds, Postfix's command_time_limit) and
    ``flags`` (Postfix's pipe flags: B D F O R h u . >)."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise _Invalid(f"expected [pipe_transports.NAME] tables, got {_show(value)}")
    out: dict[str, PipeTransport] = {}
    for name, table in value.items():
        label = f"pipe_transports.{_toml_key(name)}"
        if not _TRANSPORT.fullmatch(name) or name in settings.BUILTIN_TRANSPORTS:
            raise _Invalid(f"bad transport name {_show(name)} (letters, digits and -, not one of "
                           f"{', '.join(settings.BUILTIN_TRANSPORTS)})", sub=(name,), label=label)
        for key in table:
            if key not in _PIPE_KEYS:
                raise _Invalid(f'unknown key "{label}.{key}"{_suggest(key, _PIPE_KEYS)}',
                               sub=(name, key), label=f"{label}.{key}", bare=True)
        argv = table.get("argv")
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and a for a in argv) or not argv[0].startswith("/")):
            raise _Invalid(f"expected an array of strings, the first an absolute path, got "
                           f"{_show(argv)}", sub=(name, "argv"), label=f"{label}.argv")
        from engine.delivery.pipe import unknown_macros

        if unknown := unknown_macros(tuple(argv)):
            raise _Invalid(f"unknown macro ${{{sorted(unknown)[0]}}} in {_show(argv)}",
                           sub=(name, "argv"), label=f"{label}.argv")
        user = table.get("user")
        if not isinstance(user, str) or not user or user == "root" or user.startswith("0"):
            raise _Invalid(f"expected a user name other than root, got {_show(user)}",
                           sub=(name, "user"), label=f"{label}.user")
        try:
            limit = _duration(allow_zero=False)(table.get("time_limit", 1000))
        except _Invalid as exc:
            raise _Invalid(str(exc), sub=(name, "time_limit"),
                           label=f"{label}.time_limit") from None
        from engine.delivery.pipe import FLAGS

        flags = table.get("flags", "")
        if not isinstance(flags, str) or not set(flags) <= set(FLAGS):
            raise _Invalid(f"expected flags among {FLAGS!r}, got {_show(flags)}",
                           sub=(name, "flags"), label=f"{label}.flags")
        out[name] = PipeTransport(tuple(argv), user, limit, flags)
    return out


def _table_spec(value: Any) -> str:
    """"" (none) or a lookup table "type:name" (engine.tables)."""
    from engine.tables import TABLE_TYPES

    text = _string(value)
    kind, colon, name = text.partition(":")
    if text and (not colon or not name or kind.lower() not in TABLE_TYPES):
        raise _Invalid(f'expected "type:name" with a type among {", ".join(TABLE_TYPES)}, '
                       f"got {_show(value)}")
    return text


def _alias_map(value: str) -> str:
    """One alias_maps entry: "type:name"; a texthash file by its absolute path."""
    from engine.tables import TABLE_TYPES

    kind, colon, name = value.partition(":")
    if not colon or not name or kind.lower() not in TABLE_TYPES:
        raise _Invalid(f'expected "type:name" with a type among {", ".join(TABLE_TYPES)}')
    if kind.lower() == "texthash" and not name.startswith("/"):
        raise _Invalid("expected an absolute path")
    return value


def _expansion_class(value: str) -> str:
    if value.lower() not in ("alias", "forward", "include"):
        raise _Invalid('expected "alias", "forward" or "include"')
    return value.lower()


def _forward_template(value: str) -> str:
    if not value.startswith(("/", "$")):
        raise _Invalid('expected an absolute path (e.g. "$home/.forward")')
    return value


def _default_privs(value: Any) -> str:
    import pwd

    text = _string(value, empty=False)
    try:
        privileged = pwd.getpwnam(text).pw_uid == 0
    except KeyError:
        privileged = False
    if privileged:
        raise _Invalid(f"{_show(value)} is a privileged user (Postfix refuses it too)")
    return text


_SIZE_FIELDS = {"message_size_limit", "line_length_limit", "queue_map_size",
                "queue_map_size_limit", "bounce_size_limit"}
_INT_MINIMUM = {
    "line_length_limit": 512,  # RFC 5321 command lines; Postfix's minimum too
    "message_size_limit": 0,  # 0 = no limit (Postfix)
    "smtp_connection_reuse_count_limit": 0,  # 0 = no limit (Postfix)
    "smtp_mx_address_limit": 0,  # 0 = no limit (Postfix)
    "smtp_mx_session_limit": 0,  # 0 = no limit (Postfix)
    "worker_count": 0,  # 0 = one per core
    "duplicate_filter_limit": 0,  # 0 = no limit (Postfix's been_here)
    "smtpd_client_auth_failure_limit": 0,  # 0 = no limit
    "smtpd_client_connection_count_limit": 0,  # 0 = off (Postfix)
    "smtpd_client_connection_rate_limit": 0,
    "smtpd_client_message_rate_limit": 0,
    "smtpd_client_recipient_rate_limit": 0,
    "queue_map_size": 65536,
}
_DURATION_SUFFIXES = ("_time", "_timeout", "_delay", "_window", "_lifetime", "_time_limit",
                      "_time_unit")
# 0 = off / at once; every other duration is > 0
_ZERO_DURATIONS = {"queue_commit_window", "delay_warning_time", "default_destination_rate_delay",
                   "smtp_connection_cache_time_limit", "smtpd_error_sleep_time",
                   "lmtp_connect_timeout"}
_SPECIAL: dict[str, Converter] = {
    "myhostname": _hostname,
    "mydomain": _optional_hostname,
    "mydestination": _str_list(_domain, "domains"),
    "relay_domains": _str_list(_domain, "domains"),
    "mynetworks": _str_list(_network, "networks"),
    "smtpd_authorized_xclient_hosts": _str_list(_network, "networks"),
    "smtpd_authorized_xforward_hosts": _str_list(_network, "networks"),
    "dns_servers": _str_list(_dns_server, "addresses"),
    "relayhost": _relayhost,
    "transport_maps": _transport_maps,
    "sender_dependent_default_transport_maps": _sender_transport_maps,
    "transport": _transport_tables,
    "proxy_interfaces": _str_list(lambda entry: str(ipaddress.ip_address(entry)), "addresses"),
    "smtp_bind_address": _bind_address(4),
    "smtp_bind_address6": _bind_address(6),
    "pipe_transports": _pipe_transports,
    "alias_maps": _str_list(_alias_map, "tables"),
    "forward_path": _str_list(_forward_template, "paths"),
    "allow_mail_to_commands": _str_list(_expansion_class, "names"),
    "allow_mail_to_files": _str_list(_expansion_class, "names"),
    "default_privs": _default_privs,
    "virtual_mailbox_domains": _str_list(_domain, "domains"),
    "virtual_mailbox_maps": _table_spec,
    "virtual_uid_maps": _table_spec,
    "virtual_gid_maps": _table_spec,
    "virtual_mailbox_base": _optional_path,
    "mail_spool_directory": lambda value: _string(value, empty=False),
    "listen": _listen,
    "queue_directory": _path,
    "smtp_helo_name": _helo_name,
    "lmtp_lhlo_name": _helo_name,
    "smtpd_banner": lambda value: _string(value, empty=False),
    "smtpd_sasl_password_file": _optional_path,
    "smtpd_forbid_bare_newline": _bare_newline,
    "smtpd_forbid_bare_newline_exclusions": _client_networks,
    "smtpd_forbid_bare_newline_reject_code": _reply_code("5"),
    "smtpd_client_event_limit_exceptions": _client_networks,
    "smtpd_tls_security_level": _tls_security_level,
    "smtp_address_preference": _choice("ipv4", "ipv6", "any"),
    "smtpd_tls_protocols": _tls_protocols,
    "smtp_tls_protocols": _tls_protocols,
    "smtp_tls_security_level": _smtp_tls_level,
    "smtp_tls_policy_maps": _opened_table,
    "smtp_sasl_password_maps": _opened_table,
    "smtp_sasl_mechanism_filter": _sasl_mechanism_filter,
    "smtp_sasl_security_options": _str_list(_sasl_option, "SASL security options"),
    "smtp_sasl_tls_security_options": _str_list(_sasl_option, "SASL security options"),
    "sender_dependent_relayhost_maps": _sender_relayhost_maps,
    "empty_address_relayhost_maps_lookup_key": lambda value: _string(value, empty=False),
    "smtp_tls_CAfile": _optional_path,
    "smtp_tls_CApath": _optional_path,
    "tlsrpt_CAfile": _optional_path,
    "smtp_mta_sts_CAfile": _optional_path,
    "smtp_tls_fingerprint_digest": _digest,
    "tls_high_cipherlist": lambda value: _string(value, empty=False),
    "tls_medium_cipherlist": _string,
    "tls_server_sni_maps": _sni_maps,
    "smtpd_null_access_lookup_key": lambda value: _string(value, empty=False),
    **{key: _restrictions(key) for key in (
        "smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions",
        "smtpd_relay_restrictions", "smtpd_recipient_restrictions", "smtpd_data_restrictions")},
    **{key: _reply_code("45") for key in ("access_map_reject_code", "reject_code",
                                          "relay_domains_reject_code",
                                          "unknown_local_recipient_reject_code",
                                          "unknown_virtual_mailbox_reject_code",
                                          "non_fqdn_reject_code",
                                          "invalid_hostname_reject_code",
                                          "unknown_address_reject_code",
                                          "unknown_hostname_reject_code")},
    **{key: _reply_code("4") for key in ("access_map_defer_code", "defer_code")},
}


def _converter(name: str, kind: Any) -> Converter:
    if name in _SPECIAL:
        return _SPECIAL[name]
    if kind is bool:
        return _bool
    if kind is int:
        what = "a size in bytes" if name in _SIZE_FIELDS else "an integer"
        return _int(what, _INT_MINIMUM.get(name, 1))
    if kind is float:
        if name.endswith(_DURATION_SUFFIXES):
            return _duration(allow_zero=name in _ZERO_DURATIONS)
        return _number
    if kind is str:
        return _string
    if kind is Path:
        return _path
    if kind == tuple[str, ...]:
        return _str_list(lambda entry: entry, "strings")
    raise TypeError(f"Config.{name}: no TOML converter for {kind!r}")  # a new field needs one


_CONVERTERS: dict[str, Converter] = {
    name: _converter(name, kind)
    for name, kind in typing.get_type_hints(Config).items()
    if name != "config_file"
}

# -- load_config ---------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The configuration in the TOML file at ``path``, or the embedded defaults for None.

    Keys are Config's field names (Postfix's parameter names); keys left out keep their
    defaults. Raises ConfigError, naming the file, line and key, for a file that cannot be read,
    a TOML syntax error, an unknown key or a bad value."""
    if path is None:
        return Config()
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=file) from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError("not UTF-8 text", file=file, line=line) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = None
        m = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if m:
            line = int(m.group(1))
            message = f"{message[: m.start()]} (column {m.group(2)})"
        elif message.endswith(" (at end of document)"):
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
            message = message.removesuffix(" (at end of document)") + " at end of file"
        raise ConfigError(f"TOML syntax error: {message}", file=file, line=line) from None
    return _build(document, text, file)


def _check_relay_guard(config: Config, values: dict[str, Any], found: Any, lines: list[str],
                       file: str) -> None:
    """As Postfix refuses to start: the relay or recipient list must hold
    reject_unauth_destination, reject or defer, or the server is an open relay."""
    from engine.policy.restrictions import ALIASES, RELAY_GUARDS

    names = {ALIASES.get(token.lower(), token.lower()) for token in
             config.smtpd_relay_restrictions + config.smtpd_recipient_restrictions}
    if names & RELAY_GUARDS:
        return
    key = ("smtpd_relay_restrictions" if "smtpd_relay_restrictions" in values
           else "smtpd_recipient_restrictions")
    raise ConfigError(
        f"{key}: in smtpd_relay_restrictions or smtpd_recipient_restrictions, specify at least "
        "one of reject_unauth_destination, reject or defer (else this is an open relay)",
        file=file, line=_line_of(found, lines, (key,)), key=key)


def _build(document: dict[str, Any], text: str, file: str) -> Config:
    found = _key_lines(text)
    lines = text.split("\n")
    values: dict[str, Any] = {}
    for key, raw in document.items():
        name = KEY_ALIASES.get(key, key)
        convert = _CONVERTERS.get(name)
        if convert is None:
            if key == "config_file":
                message = 'unknown key "config_file" (Tern sets it to the file\'s path)'
            else:
                message = f'unknown key "{_toml_key(key)}"{_suggest(key, _CONVERTERS)}'
            line = _line_of(found, lines, (key,))
            raise ConfigError(message, file=file, line=line, key=key)
        try:
            values[name] = convert(raw)
        except _Invalid as exc:
            label = exc.label or key
            message = str(exc) if exc.bare else f"{label}: {exc}"
            line = _line_of(found, lines, (key, *exc.sub), exc.entry)
            raise ConfigError(message, file=file, line=line, key=label) from None
    config = Config(**values, config_file=file)
    _check_auth(config, values, found, lines, file)
    _check_client_auth(config, values, found, lines, file)
    _check_relay_guard(config, values, found, lines, file)
    _check_transport_names(config, found, lines, file)
    if config.maximal_backoff_time < config.minimal_backoff_time:
        key = "maximal_backoff_time" if "maximal_backoff_time" in values else "minimal_backoff_time"
        raise ConfigError(
            f"{key}: maximal_backoff_time ({config.maximal_backoff_time:g}s) is less than "
            f"minimal_backoff_time ({config.minimal_backoff_time:g}s)",
            file=file,
            line=_line_of(found, lines, (key,)),
            key=key,
        )
    _check_tls(config, found, lines, file)
    if "alias_maps" in values:
        _check_alias_maps(config, found, lines, file)
    return config


def _check_alias_maps(config: Config, found: dict, lines: list[str], file: str) -> None:
    """alias_maps written in the file are read now, so a missing or malformed alias file stops
    start-up with its name and line (the default /etc/aliases may be absent)."""
    from engine.delivery.aliases import AliasTable
    from engine.tables import TableError, open_table

    key = "alias_maps"
    for spec in config.alias_maps:
        kind, _, name = spec.partition(":")
        try:
            if kind.lower() == "texthash":
                if not os.path.exists(name):
                    raise TableError(f"{name}: cannot read: No such file or directory")
                AliasTable(spec, name)
            else:
                open_table(spec)
        except (TableError, OSError) as error:
            raise ConfigError(f"{key}: {error}", file=file,
                              line=_line_of(found, lines, (key,)), key=key) from None


def _check_auth(config: Config, values: dict[str, Any], found: dict, lines: list[str],
                file: str) -> None:
    """AUTH needs credentials: a submission listener (which requires AUTH) or
    smtpd_sasl_auth_enable without smtpd_sasl_password_file, or a password file that cannot
    be read or has a bad line, stops start-up here rather than at the first client."""
    from engine.auth.passwd_file import PasswdFileError, load

    key = "smtpd_sasl_password_file"
    path = config.smtpd_sasl_password_file
    if not path:
        submission = [(index, item.service) for index, item in enumerate(config.listen)
                      if item.service in settings.AUTH_REQUIRED_SERVICES]
        if submission:
            index, service = submission[0]
            why, where = f'[[listen]] service "{service}"', ("listen", index, "service")
        elif config.smtpd_sasl_auth_enable:
            why, where = "smtpd_sasl_auth_enable = true", ("smtpd_sasl_auth_enable",)
        else:
            return
        raise ConfigError(f"{key}: required by {why} (AUTH needs credentials to check)",
                          file=file, line=_line_of(found, lines, where), key=key)
    try:
        load(path)
    except PasswdFileError as error:
        raise ConfigError(f"{key}: {error}", file=file, line=_line_of(found, lines, (key,)),
                          key=key) from None


def _check_client_auth(config: Config, values: dict[str, Any], found: dict, lines: list[str],
                       file: str) -> None:
    """As Postfix's smtp refuses to run: smtp_sasl_auth_enable needs smtp_sasl_password_maps
    (here or in each [transport.NAME] that turns it on). And a sender_dependent_relayhost_maps
    key that is no address is the null sender's, so it must be that lookup key."""
    for name, overrides in [("", {}), *config.transport.items()]:
        settings_of = config.for_transport(name) if name else config
        if settings_of.smtp_sasl_auth_enable and not settings_of.smtp_sasl_password_maps:
            key = f"transport.{_toml_key(name)}.smtp_sasl_auth_enable" if name else \
                "smtp_sasl_auth_enable"
            where = ("transport", name, "smtp_sasl_auth_enable") if name and \
                "smtp_sasl_auth_enable" in overrides else ("smtp_sasl_auth_enable",)
            raise ConfigError(f"{key}: needs smtp_sasl_password_maps (the table of"
                              " username:password per next hop)", file=file,
                              line=_line_of(found, lines, where), key=key)
    null_key = config.empty_address_relayhost_maps_lookup_key.lower()
    for sender in config.sender_dependent_relayhost_maps:
        if "@" not in sender and sender != null_key:
            key = f"sender_dependent_relayhost_maps.{_toml_key(sender)}"
            raise ConfigError(
                f'{key}: expected "user@domain", "@domain" or the null sender\'s key'
                f' "{config.empty_address_relayhost_maps_lookup_key}"'
                " (empty_address_relayhost_maps_lookup_key)", file=file,
                line=_line_of(found, lines, ("sender_dependent_relayhost_maps", sender)),
                key=key)


def _check_tls(config: Config, found: dict, lines: list[str], file: str) -> None:
    """TLS settings that only make sense together, and the certificate files themselves
    (read and matched with pyOpenSSL, engine.tls.certs), so a bad file stops start-up with
    its name rather than failing handshakes later."""

    def error(key: str, message: str, sub: tuple = ()) -> ConfigError:
        label = ".".join([key, *(_toml_key(str(part)) for part in sub if isinstance(part, str))])
        return ConfigError(f"{label}: {message}", file=file,
                           line=_line_of(found, lines, (key, *sub)), key=label)

    if config.tls_medium_cipherlist:  # the SMTP client's list (engine.tls.client)
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(config.tls_medium_cipherlist)
        except ssl.SSLError:
            raise error("tls_medium_cipherlist",
                        f"no cipher matches {_show(config.tls_medium_cipherlist)}") from None
    cert = config.smtpd_tls_cert_file
    if not cert:
        for key in ("smtpd_tls_key_file", "tls_server_sni_maps"):
            if getattr(config, key):
                raise error(key, "needs smtpd_tls_cert_file (the default certificate)")
        if config.smtpd_tls_security_level in ("may", "encrypt"):
            raise error("smtpd_tls_security_level",
                        f'"{config.smtpd_tls_security_level}" needs smtpd_tls_cert_file')
        for index, listener in enumerate(config.listen):
            if listener.service == "smtps":
                raise error("listen", '"smtps" (implicit TLS) needs smtpd_tls_cert_file',
                            (index, "service"))
        return
    import ssl  # here: the sans-I/O cores import engine.config, and ssl must not come with it

    from engine.tls.certs import CertificateError, check_key_pair

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(config.tls_high_cipherlist)
    except ssl.SSLError:
        raise error("tls_high_cipherlist",
                    f"no cipher matches {_show(config.tls_high_cipherlist)}") from None
    try:
        check_key_pair(cert, config.smtpd_tls_key_file)
    except CertificateError as exc:
        key_file = config.smtpd_tls_key_file
        key = ("smtpd_tls_key_file" if key_file and key_file != cert
               and str(exc).startswith(key_file) else "smtpd_tls_cert_file")
        raise error(key, str(exc)) from None
    for domain, pem in config.tls_server_sni_maps.items():
        try:
            check_key_pair(pem)
        except CertificateError as exc:
            raise error("tls_server_sni_maps", str(exc), (domain,)) from None


# Agents that are not SMTP: a [transport.NAME] table of that name would silently replace them
_NOT_SMTP = tuple(name for name in settings.BUILTIN_TRANSPORTS if name != "smtp")


def _check_transport_names(config: Config, found: dict, lines: list[str], file: str) -> None:
    """Once every table is read: a [transport.NAME] is no built-in agent but smtp and no
    [pipe_transports.NAME] too (either would replace an agent without a word), and a
    transport_maps-style value naming one has a next hop that parses as smtp's (the check at
    the value itself could not know the name was an SMTP transport)."""
    for name in config.transport:
        why = ("a built-in transport" if name in _NOT_SMTP else
               "also a [pipe_transports] table" if name in config.pipe_transports else "")
        if why:
            key = f"transport.{_toml_key(name)}"
            raise ConfigError(f"{key}: {_show(name)} is {why}; give this SMTP transport another "
                              "name", file=file, line=_line_of(found, lines, ("transport", name)),
                              key=key)
    for table in ("transport_maps", "sender_dependent_default_transport_maps"):
        for pattern, target in getattr(config, table).items():
            transport, _, nexthop = target.partition(":")
            if transport not in config.transport:
                continue
            try:
                parse_transport_nexthop("smtp", nexthop)
            except ValueError as exc:
                where = next((path for path in found if len(path) == 2 and path[0] == table
                              and str(path[1]).lower() == pattern), (table,))  # keys: any case
                raise ConfigError(f"{table}.{_toml_key(pattern)}: bad next hop: {exc}",
                                  file=file, line=_line_of(found, lines, where),
                                  key=f"{table}.{_toml_key(pattern)}") from None
