"""engine.tables: type:name lookup tables read at start-up (texthash, inline, static, cidr)."""

import asyncio

import pytest

from engine.tables import Table, TableError, open_table


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_texthash_reads_postfix_source_format(tmp_path):
    path = write(tmp_path, "access", (
        "# a comment\n"
        "\n"
        "Example.COM   REJECT go away\n"
        "user@example.net\tOK\n"
        "multi.test    550 first part\n"
        "   and the continuation\n"
        "  # a comment too: the first non-blank is '#' (postmap)\n"
        "   continued still\n"
        "dup.test      OK\n"
        "dup.test      REJECT\n"))
    table = open_table(f"texthash:{path}")
    assert table.get("example.com") == "REJECT go away"  # keys are case-folded when read
    assert table.get("Example.COM") is None  # … and looked up as the caller folds them
    assert table.get("user@example.net") == "OK"
    assert table.get("multi.test") == (
        "550 first part and the continuation continued still")
    assert table.get("dup.test") == "OK"  # the first entry wins
    assert table.get("absent.test") is None
    assert not table.remote


@pytest.mark.parametrize("text, line, problem", [
    ("ok.test OK\nlonely-key\n", 2, 'expected "key value", got "lonely-key"'),
    ("  starts indented\n", 1, "a continuation line with nothing to continue"),
    ("# c\n\nkey\tvalue\nbadkey   \n", 4, 'expected "key value", got "badkey"'),
])
def test_texthash_malformed_line_names_file_and_line(tmp_path, text, line, problem):
    path = write(tmp_path, "access", text)
    with pytest.raises(TableError) as info:
        open_table(f"texthash:{path}")
    assert str(info.value) == f"{path}:{line}: {problem}"


def test_unreadable_file(tmp_path):
    with pytest.raises(TableError, match=r"missing: cannot read: No such file"):
        open_table(f"texthash:{tmp_path}/missing")


@pytest.mark.parametrize("kind", ["texthash", "cidr"])
def test_file_tables_need_an_absolute_path(kind):
    with pytest.raises(TableError, match='expected an absolute path, got "relative/access"'):
        open_table(f"{kind}:relative/access")


def test_inline_table():
    table = open_table("inline:{ a@b.test=OK, c.test=REJECT, { d.test = 550 text, with comma } }")
    assert table.get("a@b.test") == "OK"
    assert table.get("c.test") == "REJECT"
    assert table.get("d.test") == "550 text, with comma"
    assert table.get("x.test") is None


def test_inline_whitespace_separated_keys_need_values():
    with pytest.raises(TableError, match='expected "key=value", got "c.test"'):
        open_table("inline:{ a=1, c.test = REJECT }")


@pytest.mark.parametrize("spec, problem", [
    ("inline:a=1", "expected"),
    ("inline:{ a=1", "expected"),
    ("inline:{ { a=1 }", "unbalanced"),
    ("inline:{ {{ a=1 }} }", "nested"),
    ("static:{ x", "unbalanced"),
    ("static:{ }", "expected a value"),
    ("nosuchtype:/x", 'unsupported table type "nosuchtype"'),
    ("texthash", 'expected "type:name"'),
    ("texthash:", 'expected "type:name"'),
])
def test_bad_specs(spec, problem):
    with pytest.raises(TableError, match=problem):
        open_table(spec)


def test_static_table_answers_every_key():
    assert open_table("static:OK").get("anything") == "OK"
    assert open_table("static:{ 550 5.7.1 go away }").get("x") == "550 5.7.1 go away"


def test_cidr_first_match_wins(tmp_path):
    path = write(tmp_path, "clients.cidr", (
        "# cidr_table(5)\n"
        "192.0.2.7/32        OK\n"
        "192.0.2.0/24        REJECT\n"
        "0.0.0.0/0           DUNNO\n"
        "[2001:db8::]/32     550 v6\n"
        "::ffff:0:0/96       never: mapped addresses are looked up as IPv4\n"))
    table = open_table(f"cidr:{path}")
    assert table.get("192.0.2.7") == "OK"
    assert table.get("192.0.2.8") == "REJECT"
    assert table.get("198.51.100.1") == "DUNNO"
    assert table.get("2001:db8:1::1") == "550 v6"
    assert table.get("::ffff:192.0.2.7") == "OK"
    assert table.get("2001:dbf::1") is None
    assert table.get("not-an-address") is None


@pytest.mark.parametrize("line, problem", [
    ("192.0.2.1/24 OK", "bad network \"192.0.2.1/24\""),  # host bits set, as Postfix refuses
    ("192.0.2.0/33 OK", "bad network"),
    ("192.0.2.0/24", 'expected "network/prefix result"'),
])
def test_cidr_malformed_line(tmp_path, line, problem):
    path = write(tmp_path, "c.cidr", f"# first\n{line}\n")
    with pytest.raises(TableError) as info:
        open_table(f"cidr:{path}")
    assert str(info.value).startswith(f"{path}:2: {problem}")


def test_every_table_answers_the_async_lookup_too(tmp_path):
    """Callers that can wait use ``lookup`` and work with local and (later) remote tables."""
    table = open_table("inline:{ a=1 }")

    async def both():
        return await table.lookup("a"), await table.lookup("b")

    assert asyncio.run(both()) == ("1", None)


def test_remote_table_contract():
    """A remote table answers only ``lookup``; ``get`` is not for it (compile refuses it)."""

    class Remote(Table):
        remote = True

        async def lookup(self, key):
            return "OK"

    remote = Remote("fake:x")
    with pytest.raises(NotImplementedError):
        remote.get("x")
    assert asyncio.run(remote.lookup("x")) == "OK"
