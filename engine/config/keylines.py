"""Where a key is in the TOML text: key paths mapped to their lines, for file:line errors.

Trusts that tomllib has already accepted the text; should the scan still trip, it returns what it
has found so far rather than raise, and the error message just names fewer lines.
"""

import bisect
import json
import re
import tomllib
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


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
