"""access(5) lookups: the keys tried for a client, a HELO name or a mail address, in Postfix's
order, and what a table's result means.

Pure functions over strings from the client (keys) and from the administrator's tables
(results); the restriction that asked turns the result into its reply.
"""

import re

from engine.tables import Table


def domain_keys(domain: str, parent_style: bool) -> list[str]:
    """Lookup keys for a domain: itself, then each parent (``example.com``, ``com``) when
    parent_domain_matches_subdomains lists smtpd_access_maps, else ``.example.com``, ``.com``."""
    keys = [domain]
    rest = domain
    while "." in rest:
        rest = rest.partition(".")[2]
        if not rest:
            break
        keys.append(rest if parent_style else "." + rest)
    return keys


def address_keys(address: str, parent_style: bool, null_key: str) -> list[str]:
    """access(5) order for mail addresses: user@domain, domain (and parents), user@.
    The null sender is looked up as smtpd_null_access_lookup_key ("<>")."""
    if address == "":
        return [null_key]
    full = address.lower()
    local, at, domain = full.rpartition("@")
    if not at:
        return [full]
    return [full, *domain_keys(domain.rstrip("."), parent_style), local + "@"]


def client_keys(name: str, ip: str, parent_style: bool) -> list[str]:
    """access(5) order for clients: host name (and parents) when known, then the address and
    its networks: 192.0.2.1, 192.0.2, 192.0, 192 (IPv6: drop ':'-parts from the right)."""
    keys = [] if name in ("", "unknown") else domain_keys(name.lower(), parent_style)
    delimiter = ":" if ":" in ip else "."
    rest = ip.lower()
    while rest:
        keys.append(rest)
        if delimiter not in rest:
            break
        rest = rest.rpartition(delimiter)[0]
    return keys


def first_match(table: Table, keys: list[str]) -> str | None:
    """The value of the first key the (local) table knows; later keys are not tried."""
    for key in keys:
        value = table.get(key)
        if value is not None:
            return value
    return None


_NUMERIC_REPLY = re.compile(r"([45])(\d\d)\s+(.*)", re.DOTALL)
_DSN = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\s+")

Result = str | tuple[int, str, str] | None


def parse_result(value: str, reject_code: int, defer_code: int) -> Result:
    """``"permit"`` for OK (or an all-numerical result, as pop-before-smtp writes), ``"dunno"``
    for DUNNO (the key counts as not found, and no shorter key is tried), ``(code, dsn, text)``
    for REJECT / DEFER [text] (access_map_reject_code / access_map_defer_code) and
    ``4NN text`` / ``5NN text`` (an enhanced status code may lead the text; default X.7.1);
    the restriction names permit, reject and defer work too. None for any other action."""
    value = value.strip()
    action, _, text = value.partition(" ")
    upper = action.upper()
    text = text.strip()
    if upper in ("OK", "PERMIT") or action.isdigit() and not text:
        return "permit"
    if upper == "DUNNO":
        return "dunno"
    if upper == "REJECT":
        return reject_code, f"{reject_code // 100}.7.1", text or "Access denied"
    if upper == "DEFER":
        return defer_code, f"{defer_code // 100}.7.1", text or "Access denied"
    numeric = _NUMERIC_REPLY.fullmatch(value)
    if numeric is None:
        return None
    klass, text = numeric[1], numeric[3].strip()
    dsn = _DSN.match(text)
    detail = f"{klass}.7.1"
    if dsn:
        text, detail = text[dsn.end():], f"{klass}.{dsn[2]}.{dsn[3]}"
    return int(klass + numeric[2]), detail, text or "Access denied"
