"""Lookup tables named ``type:name``, as in Postfix: ``texthash:/etc/tern/access``,
``cidr:/etc/tern/clients.cidr``, ``inline:{ key=value, … }``, ``static:value``.

One small interface for every type. A local table (read into memory at start-up) answers with
the synchronous ``get(key)``: the per-command hot path pays for no coroutine. A remote table
(SQL, LDAP, Redis … later) sets ``remote = True`` and answers with ``await lookup(key)`` behind
a cache; every table has ``lookup``, so callers that can wait use it and work with both, and
callers on the hot path test ``remote`` once, when the configuration is compiled.
Trusts the administrator's files; a malformed one raises TableError naming file:line.
"""

from collections.abc import Callable


class TableError(ValueError):
    """A table that cannot be opened: unknown type, unreadable or malformed source
    (``str()`` names the file and line, e.g. ``/etc/tern/access:7: expected "key value"``)."""


class Table:
    """A lookup table. ``get`` for local tables; ``lookup`` for every table."""

    remote = False  # True: only ``await lookup`` answers (get raises)

    def __init__(self, spec: str) -> None:
        self.spec = spec  # "type:name", for messages

    def get(self, key: str) -> str | None:
        """The value for ``key`` (already case-folded by the caller where it should be)."""
        raise NotImplementedError

    async def lookup(self, key: str) -> str | None:
        return self.get(key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


def _openers() -> dict[str, Callable[[str, str], Table]]:
    from engine.tables.cidr import CidrTable
    from engine.tables.text import InlineTable, StaticTable, TexthashTable

    return {"texthash": TexthashTable, "inline": InlineTable, "static": StaticTable,
            "cidr": CidrTable}


TABLE_TYPES = ("cidr", "inline", "static", "texthash")


def open_table(spec: str) -> Table:
    """The table ``spec`` ("type:name") names, read now. Raises TableError."""
    kind, colon, name = spec.partition(":")
    if not colon or not name:
        raise TableError(f'expected "type:name" (e.g. texthash:/etc/tern/access), got "{spec}"')
    opener = _openers().get(kind.lower())
    if opener is None:
        raise TableError(f'unsupported table type "{kind}" in "{spec}" '
                         f"(supported: {', '.join(TABLE_TYPES)})")
    return opener(spec, name)
