"""Differential test: the compiled SMTP command grammar and its pure-Python twin (the oracle) agree.

For arbitrary command lines biased toward the grammar (MAIL FROM / RCPT TO with parameters,
quoted local parts, source routes, address literals, DSN parameters, junk, non-ASCII), both
twins return identical results or raise the same exception (GrammarError with the same Reply).
Then the server dialogue tests (test_smtp_server, test_dsn_params, test_esmtp) run again with
each grammar twin in the server, over both reader twins.
"""

import inspect
import os

import pytest
import test_dsn_params
import test_esmtp
import test_smtp_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_smtp_server import Driver

from engine import speedups
from engine.smtp import grammar, replies, server

try:
    compiled = speedups.load_exact("grammar", "compiled")
except ImportError:
    if os.environ.get("TERN_REQUIRE_COMPILED") == "1":
        raise
    pytest.skip("compiled grammar not built", allow_module_level=True)
pure = speedups.load_exact("grammar", "pure")

SYNTAX = replies.MAIL_SYNTAX
BAD = replies.BAD_SENDER


def outcome(function, *args, **kwargs):
    """The result, or the exception as (class, reply) for GrammarError and (class, args)."""
    try:
        return function(*args, **kwargs)
    except grammar.GrammarError as error:
        return (type(error), error.reply, str(error))
    except Exception as error:  # the same class and args are expected from both twins
        return (type(error), error.args)


def address_in(arg: str) -> str:
    """What a path's angle brackets hold, or the whole argument."""
    start, end = arg.find("<"), arg.rfind(">")
    return arg[start + 1 : end] if 0 <= start < end else arg


def observe(module, line: bytes):
    """Everything the grammar functions say about one command line."""
    split = outcome(module.split_command, line)
    arg = split[1] if isinstance(split[1], str) else line.decode("utf-8", "surrogateescape")
    address = address_in(arg)
    return [
        split,
        outcome(module.parse_mail_from, arg),
        outcome(module.parse_rcpt_to, arg),
        outcome(module.parse_path, arg, "FROM:", SYNTAX),
        outcome(module.parse_path, arg, "TO:", SYNTAX),
        outcome(module.parse_params, arg),
        outcome(module.check_mailbox, address, BAD),
        outcome(module.check_mailbox, address, BAD, allow_bare=frozenset({"postmaster"})),
    ]


# -- command lines biased toward the grammar ---------------------------------------------------

text = st.sampled_from
verbs = text(["MAIL", "mail", "Mail", "RCPT", "rcpt", "HELO", "EHLO", "DATA", "NOOP", "", "X"])
prefixes = text(["FROM:", "from:", "TO:", "to:", "FROM:", "TO:", "From: ", "FROM", "TO", "FROM: ",
                 "TO:  ", "FRO:", ""])
atoms = text(["a", "b.c", "user", "first.last", "x+tag", "!#$%&'*/=?^_`{|}~-", "A1", "ı", "ſ",
              "jörg", "用户", "a.ü"])  # RFC 6531: UTF-8 in atoms, quoted strings, sub-domains
quoted = text(['"a b"', '"a\\"b"', '"\\\\"', '""', '"a@b"', '"a', '"\\\x01"', '"é"'])
locals_ = st.one_of(atoms, quoted, text([".a", "a.", "a..b", "", "a b", "a\tb"]))
good_labels = text(["example", "com", "a", "a-b", "x1", "1", "mail-01", "Z", "bücher", "例子"])
labels = st.one_of(good_labels, good_labels, text(["-a", "a-", "", "é", "b_c", "a b"]))


def dotted(label_strategy):
    return st.lists(label_strategy, min_size=1, max_size=4).map(".".join)


good_domains = st.one_of(dotted(good_labels), dotted(good_labels).map(lambda d: d + "."))
domains = st.one_of(good_domains, good_domains, dotted(labels).flatmap(
    lambda d: text([d, d + ".", d + ".."])
))
good_literals = text(["[1.2.3.4]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "[IPv6:::ffff:1.2.3.4]"])
literals = st.one_of(good_literals, text([
    "[300.1.1.1]", "[junk]", "[]", "[a[b]", "[1.2.3.4", "[127.0.0.1]x", "[a@b]", "[IPv6:1.2.3.4]",
    "[1.2.3]", "[01.2.3.4]", "[IPv6:::1:2:3:4:5:6:7:8]", "[ 1.2.3.4]",
]))
good_locals = st.one_of(atoms, atoms, text(['"a b"', '"a\\"b"', '"a@b"', '"\\\\"', '""']))
good_mailboxes = st.tuples(good_locals, st.one_of(good_domains, good_domains, good_literals)).map(
    "@".join
)
mailboxes = st.one_of(
    good_mailboxes,
    good_mailboxes,
    st.tuples(locals_, st.one_of(domains, literals)).map("@".join),
    text(["postmaster", "PostMaster", "postmaster@example.com", "", "@", "a@", "@b", "a@b@c"]),
)
routes = st.one_of(
    st.just(""),
    st.just(""),
    st.lists(domains.map(lambda d: "@" + d), min_size=1, max_size=3).map(
        lambda r: ",".join(r) + ":"
    ),
    text(["@:", "@a,:", "@a,@:", ",@a:", "@a@b:", "@a", "@a:@b:"]),
)
good_params = text([
    "SIZE=1000", "BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8", "RET=FULL", "RET=hdrs", "ENVID=QQ314",
    "ENVID=a+2Bb", "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=delay",
    "ORCPT=rfc822;a+40b", "ORCPT=rfc822;x@y", "AUTH=<>", "size=", "a-b", "K=v=w", "A=é", "X=",
])
params = st.one_of(good_params, good_params, text(["=x", "-a=b", "X_Y=1", "é=1", "", "a.b"]))
spaces = st.one_of(st.just(" "), st.just(" "), text(
    ["  ", "", "\t", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u3000", "\n", "\r"]
))
param_lists = st.lists(st.tuples(spaces, params).map("".join), max_size=4).map("".join)
junk = text([" ", "<", ">", "<>", ":", "@", ",", '"', "\\", "\n", "\r", "\t", "\x00", "\x7f",
             "é", "ß", "ﬀ", "\udcff", "K"])


def build(parts):
    verb, gap, prefix, route, mailbox, close, tail, trailer = parts
    return "".join([verb, gap, prefix, "<", route, mailbox, close, tail, trailer])


structured = st.tuples(
    verbs, text([" ", " ", "  ", " \t", ""]), prefixes, routes, mailboxes,
    text([">", ">", ">", ">>", "", "<"]), param_lists, text(["", "", " ", "  ", "x", "\n"]),
).map(build)
free_form = st.lists(st.one_of(verbs, prefixes, atoms, domains, literals, params, junk),
                     max_size=12).map("".join)


def to_bytes(line: str) -> bytes:
    return line.encode("utf-8", "surrogateescape")


lines = st.one_of(
    structured.map(to_bytes),
    structured.map(to_bytes),
    free_form.map(to_bytes),
    st.binary(max_size=40),
    st.tuples(structured.map(to_bytes), st.binary(max_size=4), st.integers(0, 60)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
@example(b"MAIL FROM:<a@b.c> SIZE=10 BODY=8BITMIME")
@example(b"  rcpt   to: <@x,@y.z:\"q b\"@[IPv6:::1]>  NOTIFY=SUCCESS,DELAY\x1cORCPT=rfc822;a  ")
@example(b"RCPT TO:<PostMaster> \xc3\xa9=1")
@example(b"MAIL FROM:<a@b> \x85X=1")  # NEL: str.split() splits there
@example(b"mail from:<a@b>\n x")  # "." stops at a newline
@example("MAİL FRoM:<ſ@b>".encode())
@example(b"\xff\xfe MAIL")
@example("MAIL FROM:<jörg@bücher.test> SMTPUTF8".encode())
@example('RCPT TO:<"ä b"@例子.广告> NOTIFY=NEVER'.encode())
@example(b"MAIL FROM:<\xc3\xa9\xff@b.test> SMTPUTF8")
def test_compiled_and_pure_twins_agree(line):
    assert observe(compiled, line) == observe(pure, line)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30), st.text(max_size=6), st.sampled_from([frozenset(), frozenset({"a"})]))
def test_twins_agree_on_any_text(arg, prefix, allow_bare):
    for module_args in [
        ("parse_path", (arg, prefix, SYNTAX), {}),
        ("parse_params", (arg,), {}),
        ("check_mailbox", (arg, BAD), {"allow_bare": allow_bare}),
        ("parse_mail_from", (arg,), {}),
        ("parse_rcpt_to", (arg,), {}),
    ]:
        name, args, kwargs = module_args
        assert outcome(getattr(compiled, name), *args, **kwargs) == outcome(
            getattr(pure, name), *args, **kwargs
        ), name


def test_compiled_twin_has_the_pure_interface():
    public = {name for name in vars(pure) if not name.startswith("_")} - {"re", "replies", "Reply",
                                                                          "parse_address_literal"}
    assert public <= set(vars(compiled))
    assert compiled.GrammarError is grammar.GrammarError
    for name in ("dsn_ret", "dsn_envid", "dsn_notify", "dsn_orcpt", "xtext_decode", "domain_of"):
        assert getattr(compiled, name) is getattr(pure, name)


def test_server_uses_the_loaded_grammar():
    loaded = speedups.load("grammar")
    assert server.split_command is loaded.split_command
    assert server.parse_mail_from is loaded.parse_mail_from
    assert server.parse_rcpt_to is loaded.parse_rcpt_to


# -- the server dialogue tests again, with each grammar twin in the server ----------------------

@pytest.fixture(params=["compiled", "pure"])
def grammar_twin(request, monkeypatch):
    module = compiled if request.param == "compiled" else pure
    for name in ("split_command", "parse_mail_from", "parse_rcpt_to"):
        monkeypatch.setattr(server, name, getattr(module, name))
    return module


@pytest.fixture
def smtp(impl, grammar_twin):
    reader_class = impl("reader").Reader
    return lambda **kwargs: Driver(reader_class, **kwargs)


for _module in (test_smtp_server, test_dsn_params, test_esmtp):
    for _name, _test in vars(_module).items():
        if _name.startswith("test_") and "smtp" in inspect.signature(_test).parameters:
            globals()[f"test_server_{_module.__name__[5:]}_{_name[5:]}"] = _test
