"""Postfix-style values: durations, host names, next hops, DNS servers, listen addresses.

Pure functions that trust none of their input (the administrator's file, or a next hop met while
routing): anything malformed raises ValueError with a message fit for the administrator.
"""

import json
import math
import re
from typing import Any

from engine.ipliteral import parse_ip


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


def parse_transport_nexthop(transport: str, nexthop: str) -> tuple[str, int | None, bool]:
    """A transport_maps next hop for ``transport``. smtp: parse_nexthop's forms. lmtp: those,
    ``inet:`` before them, or ``unix:/path`` (returned as ``("unix:/path", None, False)``).
    Every other transport (local, virtual, error, discard, pipe) takes free text: a reason,
    a domain, or nothing (returned as ``(text, None, False)``). Raises ValueError."""
    if transport == "lmtp":
        if nexthop.startswith("unix:"):
            if not nexthop[5:].startswith("/"):
                raise ValueError(f"expected unix:/absolute/path, got {_show(nexthop)}")
            return nexthop, None, False
        return parse_nexthop(nexthop.removeprefix("inet:"))
    if transport == "smtp":
        return parse_nexthop(nexthop)
    return nexthop, None, False
