"""Tables from text: ``texthash:`` (a Postfix source file, read whole at start-up),
``inline:{ key=value, … }`` and ``static:value`` (from the configuration itself).

Keys are case-folded when read, as postmap does; values are kept as written. Trusts the
administrator's text; a malformed line raises TableError naming file:line.
"""

from engine.tables import Table, TableError


def read_source(path: str) -> list[tuple[int, str]]:
    """The logical lines of a Postfix table source with their first line number: blank lines
    and ``#`` comment lines dropped, a line starting with whitespace continuing the one before
    (postmap(1) INPUT FILE FORMAT). The path must be absolute: a table never depends on the
    directory the server was started from."""
    if not path.startswith("/"):
        raise TableError(f'expected an absolute path, got "{path}"')
    try:
        with open(path, encoding="utf-8") as source:
            text = source.read()
    except OSError as error:
        raise TableError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise TableError(f"{path}: not UTF-8 text") from None
    logical: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise TableError(f"{path}:{number}: a continuation line with nothing to continue")
            first, before = logical[-1]
            logical[-1] = (first, f"{before} {stripped}")
        else:
            logical.append((number, stripped))
    return logical


class TexthashTable(Table):
    """``texthash:/path``: "key value" lines, as postmap reads them, held in a dict."""

    def __init__(self, spec: str, path: str) -> None:
        super().__init__(spec)
        self._entries: dict[str, str] = {}
        for number, line in read_source(path):
            key, _, value = line.partition(" ")
            if "\t" in key:
                key, _, rest = key.partition("\t")
                value = f"{rest} {value}"
            value = value.strip()
            if not value:
                raise TableError(f'{path}:{number}: expected "key value", got "{line}"')
            self._entries.setdefault(key.lower(), value)  # the first entry wins, as postmap -r

    def get(self, key: str) -> str | None:
        return self._entries.get(key)


def split_inline(body: str, spec: str) -> list[str]:
    """The items of ``{ a=1, b=2, { c = text, with commas } }``: split on commas and
    whitespace outside inner braces; an inner ``{ … }`` is one item, braces and edges stripped."""
    body = body.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TableError(f'expected "{{ key=value, … }}" in "{spec}"')
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in body[1:-1]:
        if char == "{":
            depth += 1
            if depth > 1:
                raise TableError(f'nested braces in "{spec}"')
            continue
        if char == "}":
            if depth == 0:
                raise TableError(f'unbalanced "}}" in "{spec}"')
            depth -= 1
            items.append("".join(current).strip())
            current = []
            continue
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                items.append("".join(current).strip())
                current = []
            continue
        current.append(char)
    if depth:
        raise TableError(f'unbalanced "{{" in "{spec}"')
    if current:
        items.append("".join(current).strip())
    return [item for item in items if item]


class InlineTable(Table):
    """``inline:{ key=value, { key = text with spaces } }`` (Postfix 3.0's inline table)."""

    def __init__(self, spec: str, body: str) -> None:
        super().__init__(spec)
        self._entries: dict[str, str] = {}
        for item in split_inline(body, spec):
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise TableError(f'expected "key=value", got "{item}" in "{spec}"')
            self._entries.setdefault(key.strip().lower(), value.strip())

    def get(self, key: str) -> str | None:
        return self._entries.get(key)


class StaticTable(Table):
    """``static:value`` or ``static:{ value with spaces }``: every key finds the value."""

    def __init__(self, spec: str, value: str) -> None:
        super().__init__(spec)
        value = value.strip()
        if value.startswith("{"):
            if not value.endswith("}"):
                raise TableError(f'unbalanced "{{" in "{spec}"')
            value = value[1:-1].strip()
        if not value:
            raise TableError(f'expected a value in "{spec}"')
        self._value = value

    def get(self, key: str) -> str | None:
        return self._value
