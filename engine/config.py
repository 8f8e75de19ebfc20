"""Tern's configuration: one TOML file whose keys keep Postfix's parameter names.

Trusts the administrator's file only after validation: an unknown key, a bad value or a TOML
syntax error stops start-up with one message naming the file, the line (where known) and the key.
With no file, the embedded defaults below make a loopback-only server that is not an open relay.
"""

import bisect
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.ipliteral import parse_address_literal, parse_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Services a [[listen]] table may name. "submission" and "smtps" will join when they exist.
LISTEN_SERVICES: frozenset[str] = frozenset({"smtp"})


@dataclass(frozen=True)
class Listener:
    """One ``[[listen]]`` table: where to accept SMTP, and which service runs there."""

    host: str = "127.0.0.1"
    port: int = 2525
    service: str = "smtp"


def default_myhostname() -> str:
    """The host's fully qualified name, Postfix's default for myhostname."""
    import socket  # here: the sans-I/O cores import engine.config, and no I/O module with it

    return socket.getfqdn()


def default_queue_directory() -> Path:
    """``$TERN_HOME/spool``, else the user's data directory (XDG), as the brief asks."""
    home = os.environ.get("TERN_HOME")
    if home:
        return Path(home) / "spool"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "tern" / "spool"


@dataclass(frozen=True)
class Config:
    """Every setting, with Postfix's defaults where Postfix has the concept.

    Durations are seconds."""

    config_file: str = ""  # where this came from ("" = embedded defaults)
    myhostname: str = field(default_factory=default_myhostname)
    mydomain: str = ""  # default: myhostname minus its first label
    mydestination: tuple[str, ...] = ("$myhostname", "localhost")  # local domains
    queue_directory: Path = field(default_factory=default_queue_directory)
    mynetworks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    relay_domains: tuple[str, ...] = ()
    relayhost: str = ""  # "" = deliver by MX; "[host]:port" = no MX lookup
    transport_maps: dict[str, str] = field(default_factory=dict)
    listen: tuple[Listener, ...] = (Listener(),)
    maillog_file: str = ""  # "" = stderr
    smtpd_banner: str = "$myhostname ESMTP Tern"
    # smtpd limits
    message_size_limit: int = 10240000  # 0 = no limit, as in Postfix
    smtpd_recipient_limit: int = 1000
    line_length_limit: int = 2048
    smtpd_timeout: float = 300.0
    # queue manager
    minimal_backoff_time: float = 300.0
    maximal_backoff_time: float = 4000.0
    maximal_queue_lifetime: float = 5 * 86400.0
    default_destination_concurrency_limit: int = 20
    default_destination_recipient_limit: int = 50
    # spool: the group-commit window (how long a commit waits for companions)
    queue_commit_window: float = 0.002
    queue_map_size: int = 1 << 30  # LMDB map size in bytes
    # smtp client (Postfix's names and defaults)
    smtp_helo_name: str = "$myhostname"
    smtp_connect_timeout: float = 30.0
    smtp_helo_timeout: float = 300.0
    smtp_mail_timeout: float = 300.0
    smtp_rcpt_timeout: float = 300.0
    smtp_data_init_timeout: float = 120.0
    smtp_data_xfer_timeout: float = 180.0
    smtp_data_done_timeout: float = 600.0
    smtp_quit_timeout: float = 300.0
    # DNS: servers as "ip" or "ip:port"; empty = the system's resolv.conf
    dns_servers: tuple[str, ...] = ()
    dns_timeout: float = 5.0

    def expand(self, value: str) -> str:
        """Postfix-style ``$myhostname`` / ``$mydomain`` expansion, for the values that use it."""
        return value.replace("$myhostname", self.myhostname).replace(
            "$mydomain", self.effective_mydomain
        )

    @property
    def effective_mydomain(self) -> str:
        if self.mydomain:
            return self.mydomain
        _, _, rest = self.myhostname.partition(".")
        return rest or "localdomain"

    @property
    def local_domains(self) -> frozenset[str]:
        return frozenset(self.expand(d).lower() for d in self.mydestination)


# --------------------------------------------------------------------------------------------
# Loading and validation


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


def _show(value: Any) -> str:
    """A value as the administrator wrote it (TOML-ish), short enough for a one-line message."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:75] + '..."'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # TOML dates and times


# -- durations ---------------------------------------------------------------------------------

_DURATION = re.compile(r"(-?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([smhdw]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_HINT = "a duration such as 300s, 5m, 1h, 2d or 1w"


def parse_duration(value: Any) -> float:
    """Seconds in a Postfix time value: ``"300s"``, ``"5m"``, ``"1h"``, ``"2d"``, ``"1w"``, or a
    bare number (int, float or numeric string) of seconds. Negative values and anything else
    raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}") from None
        negative = seconds < 0
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        if not m:
            raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}")
        negative = m.group(1) == "-" and float(m.group(2)) != 0
        seconds = float(m.group(2)) * _DURATION_UNITS[m.group(3)]
    else:
        raise ValueError(f"expected {_DURATION_HINT}, got {_show(value)}")
    if negative:
        raise ValueError(f"expected a duration that is not negative, got {_show(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {_show(value)}")
    return seconds


# -- host names, next hops, addresses -----------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TRANSPORT = re.compile(r"[A-Za-z0-9-]+")
_PORT = re.compile(r"[0-9]{1,5}")


def _is_hostname(text: str) -> bool:
    """A DNS host name (ASCII letters, digits, hyphens; no trailing dot), not an IP address."""
    return (
        len(text) <= 253
        and _HOSTNAME.fullmatch(text) is not None
        and not text.rpartition(".")[2].isdigit()  # no all-numeric top-level label
    )


def _port(text: str, *, allow_zero: bool = False) -> int:
    if not _PORT.fullmatch(text):
        raise ValueError(f"bad port {_show(text)}")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


_BRACKETED = r"(\[[^\[\]]*\])"  # "[...]": an IP literal (engine.ipliteral) or "[host]"


def parse_nexthop(value: str) -> tuple[str, int | None, bool]:
    """Split a Postfix next hop into ``(host, port, mx_lookup)``.

    ``""`` (the recipient's domain), ``"host"``, ``"host:port"``, ``"[host]"`` or
    ``"[host]:port"``; the bracketed forms turn off MX lookups, as in Postfix, and are the only
    place an IP address may appear (``"[192.0.2.1]"``, ``"[2001:db8::1]:25"``,
    ``"[IPv6:2001:db8::1]"``: engine.ipliteral.parse_ip). ``port`` is None when not given. Host
    names come back lower-cased, addresses in canonical form. Raises ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"expected a next hop string, got {_show(value)}")
    if value == "":
        return "", None, True
    if value.startswith("["):
        m = re.fullmatch(rf"{_BRACKETED}(?::(.*))?", value, re.DOTALL)
        if not m:
            raise ValueError(f'expected "[host]" or "[host]:port", got {_show(value)}')
        bracketed, port_text = m.group(1), m.group(2)
        ip = parse_ip(bracketed)
        host = str(ip) if ip is not None else bracketed[1:-1]
        if ip is None and ":" in host:
            raise ValueError(f"bad IPv6 address in {_show(value)}")
        mx_lookup = False
    else:
        if value.count(":") > 1:
            raise ValueError(f"an IPv6 address must be in brackets, e.g. [::1], got {_show(value)}")
        host, colon, port_text = value.partition(":")
        if not colon:
            port_text = None
        if parse_ip(host) is not None:
            raise ValueError(
                f"an IP address must be in brackets (no MX lookup): [{host}], got {_show(value)}"
            )
        ip = None
        mx_lookup = True
    if ip is None:
        if not _is_hostname(host):
            raise ValueError(f"bad host name {_show(host)} in {_show(value)}")
        host = host.lower()
    if port_text is None:
        return host, None, mx_lookup
    try:
        port = _port(port_text)
    except ValueError as exc:
        raise ValueError(f"{exc} in {_show(value)}") from None
    return host, port, mx_lookup


def parse_dns_server(value: str) -> tuple[str, int]:
    """``(ip, port)`` of a ``dns_servers`` entry: ``"ip"``, ``"ipv4:port"``, ``"[ip]"`` or
    ``"[ip]:port"`` (a bare IPv6 address is accepted without a port). Port defaults to 53."""
    if not isinstance(value, str):
        raise ValueError(f"expected a DNS server address, got {_show(value)}")
    m = re.fullmatch(rf"{_BRACKETED}(?::(.*))?", value, re.DOTALL)
    if m:
        address, port_text = m.group(1), m.group(2)
    elif value.count(":") == 1:
        address, _, port_text = value.partition(":")
    else:
        address, port_text = value, None
    ip = parse_ip(address)
    if ip is None:
        raise ValueError(f'expected "ip", "ip:port" or "[ipv6]:port", got {_show(value)}')
    port = 53 if port_text is None else _port(port_text)
    return str(ip), port


def _parse_listen_address(value: Any) -> tuple[str, int]:
    """``"host:port"`` or ``"[ipv6]:port"``; port 0 asks the kernel for a free one."""
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port" or "[ipv6]:port", got {_show(value)}')
    m = re.fullmatch(rf"{_BRACKETED}:(.*)", value, re.DOTALL)
    if m:
        ip = parse_ip(m.group(1))
        if ip is None or ip.version != 6:
            raise ValueError(f"bad IPv6 address in {_show(value)}")
        host, port_text = str(ip), m.group(2)
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon or ":" in host:
            hint = " (an IPv6 address goes in brackets: [::1]:25)" if ":" in host else ""
            raise ValueError(f'expected "host:port" or "[ipv6]:port", got {_show(value)}{hint}')
        ip = parse_ip(host)
        if ip is not None:
            host = str(ip)
        elif _is_hostname(host):
            host = host.lower()
        else:
            raise ValueError(f"bad host {_show(host)} in {_show(value)}")
    try:
        port = _port(port_text, allow_zero=True)
    except ValueError as exc:
        raise ValueError(f"{exc} in {_show(value)}") from None
    return host, port


# -- converters: raw TOML value -> field value, or _Invalid ---------------------------------------

Converter = Callable[[Any], Any]


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
            parse_nexthop(nexthop)
        except ValueError as exc:
            raise _Invalid(f"bad next hop: {exc}", **where) from None
        if domain.lower() in out:
            raise _Invalid(f"{_show(domain)} is listed twice (domains ignore case)", **where)
        out[domain.lower()] = target
    return out


_LISTEN_KEYS = ("address", "service")


def _listen(value: Any) -> tuple[Listener, ...]:
    """The ``[[listen]]`` array of tables: ``address = "host:port"``, ``service = "smtp"``."""
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
        if service not in LISTEN_SERVICES:
            allowed = ", ".join(_show(s) for s in sorted(LISTEN_SERVICES))
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
        out.append(Listener(host=host, port=port, service=service))
    return tuple(out)


_SIZE_FIELDS = {"message_size_limit", "line_length_limit", "queue_map_size"}
_INT_MINIMUM = {
    "line_length_limit": 512,  # RFC 5321 command lines; Postfix's minimum too
    "message_size_limit": 0,  # 0 = no limit (Postfix)
}
_DURATION_SUFFIXES = ("_time", "_timeout", "_delay", "_window", "_lifetime")
_ZERO_DURATIONS = {"queue_commit_window"}  # 0 = commit at once; every other duration is > 0
_SPECIAL: dict[str, Converter] = {
    "myhostname": _hostname,
    "mydomain": _optional_hostname,
    "mydestination": _str_list(_domain, "domains"),
    "relay_domains": _str_list(_domain, "domains"),
    "mynetworks": _str_list(_network, "networks"),
    "dns_servers": _str_list(_dns_server, "addresses"),
    "relayhost": _relayhost,
    "transport_maps": _transport_maps,
    "listen": _listen,
    "queue_directory": _path,
    "smtp_helo_name": _helo_name,
    "smtpd_banner": lambda value: _string(value, empty=False),
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


# -- finding the line of a key -------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _end_of_basic_string(text: str, pos: int) -> int:
    """Index just past the '"' closing the basic string whose opening quote is at ``pos``."""
    pos += 1
    while text[pos] != '"':
        pos += 2 if text[pos] == "\\" else 1
    return pos + 1


def _read_key(text: str, pos: int) -> tuple[list[str], int]:
    """A (dotted) TOML key starting at ``pos``: its parts, and the index after it."""
    parts = []
    while True:
        while text[pos] in " \t":
            pos += 1
        if text[pos] == '"':
            end = _end_of_basic_string(text, pos)
            parts.append(tomllib.loads(f"k = {text[pos:end]}")["k"])
        elif text[pos] == "'":
            end = text.index("'", pos + 1) + 1
            parts.append(text[pos + 1 : end - 1])
        else:
            m = _BARE_KEY.match(text, pos)
            if not m:
                raise ValueError(f"no key at {pos}")
            end = m.end()
            parts.append(m.group())
        pos = end
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _skip_value(text: str, pos: int) -> int:
    """From just after '=', the index of the newline ending the value (or the text's end)."""
    depth = 0
    n = len(text)
    while pos < n:
        if text.startswith('"""', pos):
            pos += 3
            while not text.startswith('"""', pos):
                pos += 2 if text[pos] == "\\" else 1
            pos += 3
            while pos < n and text[pos] == '"':
                pos += 1
            continue
        if text.startswith("'''", pos):
            pos = text.index("'''", pos + 3) + 3
            while pos < n and text[pos] == "'":
                pos += 1
            continue
        c = text[pos]
        if c == '"':
            pos = _end_of_basic_string(text, pos)
            continue
        if c == "'":
            pos = text.index("'", pos + 1) + 1
            continue
        if c == "#":
            end = text.find("\n", pos)
            pos = n if end < 0 else end
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "\n" and depth <= 0:
            return pos
        pos += 1
    return pos


def _key_lines(text: str) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Map key paths to the (first, last) line of their statement, for error messages.

    A path is the key's parts under its table: ``("myhostname",)``,
    ``("transport_maps", "example.net")``, and ``("listen", 1, "address")`` for the second
    ``[[listen]]`` table; table headers map too (``("listen", 1)``, ``("transport_maps",)``).
    Keys inside inline tables are not mapped (their parent is). Runs on text tomllib accepted;
    should it still trip, what was found so far is returned."""
    newlines = [i for i, c in enumerate(text) if c == "\n"]

    def line_at(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    found: dict[tuple[Any, ...], tuple[int, int]] = {}
    table: tuple[Any, ...] = ()
    arrays: dict[tuple[Any, ...], int] = {}
    pos, n = 0, len(text)
    try:
        while pos < n:
            c = text[pos]
            if c in " \t\r\n":
                pos += 1
            elif c == "#":
                end = text.find("\n", pos)
                pos = n if end < 0 else end
            elif c == "[":
                line = line_at(pos)
                array = text.startswith("[[", pos)
                parts, pos = _read_key(text, pos + (2 if array else 1))
                name = tuple(parts)
                if array:
                    index = arrays.get(name, 0)
                    arrays[name] = index + 1
                    table = (*name, index)
                    found.setdefault(name, (line, line))
                else:
                    table = name
                found.setdefault(table, (line, line))
                end = text.find("\n", pos)  # the rest of the line is "]" and maybe a comment
                pos = n if end < 0 else end
            else:
                first = line_at(pos)
                parts, pos = _read_key(text, pos)
                if text[pos] != "=":
                    break
                pos = _skip_value(text, pos + 1)
                span = (first, line_at(pos))
                for k in range(1, len(parts) + 1):  # dotted keys: their prefixes too
                    found.setdefault((*table, *parts[:k]), span)
    except (ValueError, IndexError, tomllib.TOMLDecodeError):
        pass
    return found


def _line_of(
    found: dict[tuple[Any, ...], tuple[int, int]],
    lines: list[str],
    path: tuple[Any, ...],
    entry: str | None = None,
) -> int | None:
    """The line of ``path`` (else of its nearest mapped parent); with ``entry``, the line
    within that statement where the entry's text appears (multi-line arrays)."""
    while path:
        if path in found:
            first, last = found[path]
            if entry:
                for needle in (f'"{entry}"', f"'{entry}'", entry):  # quoted first: "10.0.0.1"
                    for number in range(first, min(last, len(lines)) + 1):
                        if needle in lines[number - 1]:
                            return number
            return first
        path = path[:-1]
    return None


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


def _build(document: dict[str, Any], text: str, file: str) -> Config:
    found = _key_lines(text)
    lines = text.split("\n")
    values: dict[str, Any] = {}
    for key, raw in document.items():
        convert = _CONVERTERS.get(key)
        if convert is None:
            if key == "config_file":
                message = 'unknown key "config_file" (Tern sets it to the file\'s path)'
            else:
                message = f'unknown key "{_toml_key(key)}"{_suggest(key, _CONVERTERS)}'
            line = _line_of(found, lines, (key,))
            raise ConfigError(message, file=file, line=line, key=key)
        try:
            values[key] = convert(raw)
        except _Invalid as exc:
            label = exc.label or key
            message = str(exc) if exc.bare else f"{label}: {exc}"
            line = _line_of(found, lines, (key, *exc.sub), exc.entry)
            raise ConfigError(message, file=file, line=line, key=label) from None
    config = Config(**values, config_file=file)
    if config.maximal_backoff_time < config.minimal_backoff_time:
        key = "maximal_backoff_time" if "maximal_backoff_time" in values else "minimal_backoff_time"
        raise ConfigError(
            f"{key}: maximal_backoff_time ({config.maximal_backoff_time:g}s) is less than "
            f"minimal_backoff_time ({config.minimal_backoff_time:g}s)",
            file=file,
            line=_line_of(found, lines, (key,)),
            key=key,
        )
    return config
