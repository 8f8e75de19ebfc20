"""engine.policy.restrictions: parsing, access(5) keys, address forms, sync/async planning,
the per-session cache, and configuration errors naming file:line: key."""

import asyncio
from textwrap import dedent

import pytest

from engine.config import Config, ConfigError, load_config
from engine.policy.access import address_keys, client_keys, domain_keys, parse_result
from engine.policy.restrictions import (
    PERMIT,
    Facts,
    Policy,
    RestrictionError,
    SessionChecks,
    compile_list,
    split_address,
    tokenize,
)


def test_tokenize_keeps_inline_tables_whole():
    assert tokenize("permit_mynetworks,reject_unauth_destination  check_client_access "
                    "inline:{ a=1, { b = two words } }, reject") == (
        "permit_mynetworks", "reject_unauth_destination", "check_client_access",
        "inline:{ a=1, { b = two words } }", "reject")
    assert tokenize(["permit_mynetworks", "check_helo_access texthash:/x"]) == (
        "permit_mynetworks", "check_helo_access", "texthash:/x")
    with pytest.raises(RestrictionError, match="unbalanced"):
        tokenize("check_client_access inline:{ a=1")


@pytest.mark.parametrize("tokens, problem", [
    (("permit_mynetwork",), 'unknown restriction "permit_mynetwork"'),
    (("check_client_access",), '"check_client_access" needs a table'),
    (("check_client_access", "reject"), '"check_client_access" needs a table'),
    (("check_client_access", "btree:/x"), 'unsupported table type "btree"'),
])
def test_compile_errors(tokens, problem):
    config = Config(myhostname="mx.test")
    with pytest.raises(RestrictionError, match=problem):
        compile_list("smtpd_client_restrictions", tokens, Policy(config))


def test_domain_keys_follow_parent_domain_matches_subdomains():
    assert domain_keys("a.b.example.com", True) == ["a.b.example.com", "b.example.com",
                                                    "example.com", "com"]
    assert domain_keys("a.b.example.com", False) == ["a.b.example.com", ".b.example.com",
                                                     ".example.com", ".com"]


def test_address_keys_in_access5_order():
    assert address_keys("User@Sub.Example.COM", True, "<>") == [
        "user@sub.example.com", "sub.example.com", "example.com", "com", "user@"]
    assert address_keys("", True, "<>") == ["<>"]
    assert address_keys("postmaster", True, "<>") == ["postmaster"]


def test_client_keys_name_then_address_then_networks():
    assert client_keys("Mail.Example.com", "192.0.2.1", True) == [
        "mail.example.com", "example.com", "com", "192.0.2.1", "192.0.2", "192.0", "192"]
    assert client_keys("unknown", "2001:db8::1", True) == [
        "2001:db8::1", "2001:db8:", "2001:db8", "2001"]


@pytest.mark.parametrize("value, expected", [
    ("OK", "permit"), ("ok", "permit"), ("200", "permit"), ("1.2.3", None),
    ("DUNNO", "dunno"), ("permit", "permit"),
    ("REJECT", (554, "5.7.1", "Access denied")), ("reject  my text ", (554, "5.7.1", "my text")),
    ("DEFER", (450, "4.7.1", "Access denied")),
    ("550 go away", (550, "5.7.1", "go away")), ("452 4.2.2 full", (452, "4.2.2", "full")),
    ("550 4.1.1 wrong class", (550, "5.1.1", "wrong class")),
    ("250 text", None), ("HOLD", None), ("FILTER smtp:[127.0.0.1]:10025", None),
])
def test_parse_access_result(value, expected):
    assert parse_result(value, 554, 450) == expected


@pytest.mark.parametrize("address, expected", [
    ("user@Example.ORG.", ("user", "example.org", False)),
    ("user%elsewhere@example.org", ("user%elsewhere", "example.org", True)),
    ("host!user@example.org", ("host!user", "example.org", True)),
    ('"user@elsewhere"@example.org', ("user@elsewhere", "example.org", True)),
    ('"a\\"b"@example.org', ('a"b', "example.org", False)),
    ("@a.test,@b.test:user@c.test", ("user", "c.test", True)),
    ("postmaster", ("postmaster", "", False)),
])
def test_split_address_as_the_resolver_sees_it(address, expected):
    assert split_address(address) == expected


def test_lists_without_dns_are_synchronous_and_dns_lists_are_not():
    policy = Policy(Config(myhostname="mx.test",
                           smtpd_sender_restrictions=("reject_unknown_sender_domain",)))
    checks = SessionChecks(policy)
    assert checks.needs_dns("RCPT") and not checks.needs_dns("DATA")
    assert not checks.needs_dns("MAIL")  # delay_reject: the sender list waits for RCPT
    assert not SessionChecks(Policy(Config(myhostname="mx.test"))).needs_dns("RCPT")
    policy = Policy(Config(myhostname="mx.test", smtpd_delay_reject=False,
                           smtpd_sender_restrictions=("reject_unknown_sender_domain",)))
    assert SessionChecks(policy).needs_dns("MAIL")


class CountingResolver:
    """Counts lookups (the golden dns.txt runs the real resolver against unbound)."""

    def __init__(self):
        self.calls = []

    async def mx_hosts(self, domain):
        self.calls.append(domain)
        return ["mx." + domain]


def test_client_helo_sender_verdicts_are_cached_per_session_and_follow_the_facts():
    policy = Policy(Config(myhostname="mx.test", relay_domains=("example.org",),
                           smtpd_sender_restrictions=("reject_unknown_sender_domain",)))
    checks = SessionChecks(policy)
    resolver = CountingResolver()
    facts = Facts("192.0.2.1", sender="a@sender.test", recipient="b@example.org")

    async def rcpts():
        for _ in range(3):
            assert await checks.decide_async("RCPT", facts, resolver) is None
        facts.sender = "a@other.test"  # a new transaction: looked up again
        assert await checks.decide_async("RCPT", facts, resolver) is None

    asyncio.run(rcpts())
    assert resolver.calls == ["sender.test", "other.test"]


def test_a_new_client_identity_recomputes_trust():
    """PROXY/XCLIENT change the client address mid-session: mynetworks is asked again (and
    forget_client() drops every cached verdict)."""
    checks = SessionChecks(Policy(Config(myhostname="mx.test")))
    facts = Facts("127.0.0.1", recipient="b@elsewhere.test")
    assert checks.decide("RCPT", facts) is None
    facts.client_ip = "192.0.2.1"
    assert checks.decide("RCPT", facts).code == 554
    facts.client_ip = "127.0.0.1"
    checks.forget_client()
    assert checks.decide("RCPT", facts) is None


def test_permit_ends_the_list():
    policy = Policy(Config(myhostname="mx.test", smtpd_recipient_restrictions=(
        "permit", "reject")))
    rlist = policy.lists["smtpd_recipient_restrictions"]
    assert rlist.check(Facts("192.0.2.1", recipient="a@mx.test")) is PERMIT


# -- configuration -----------------------------------------------------------------------------


def load(tmp_path, text):
    path = tmp_path / "tern.toml"
    path.write_text(dedent(text))
    return path, load_config(path)


def error(tmp_path, text):
    path = tmp_path / "tern.toml"
    path.write_text(dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).replace(str(path), "tern.toml"), info.value


def test_restriction_lists_load_from_a_string_or_an_array(tmp_path):
    _, config = load(tmp_path, """\
        smtpd_client_restrictions = "permit_mynetworks, check_client_access inline:{ 1.2.3.4=OK },\
 reject"
        smtpd_helo_restrictions = ["reject_invalid_helo_hostname", "check_helo_access static:OK"]
        """)
    assert config.smtpd_client_restrictions == (
        "permit_mynetworks", "check_client_access", "inline:{ 1.2.3.4=OK }", "reject")
    assert config.smtpd_helo_restrictions == (
        "reject_invalid_helo_hostname", "check_helo_access", "static:OK")
    assert config.smtpd_relay_restrictions == (
        "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination")
    assert config.smtpd_delay_reject is True and config.smtpd_reject_unlisted_recipient is True


def test_unknown_restriction_names_file_line_and_key(tmp_path):
    message, exc = error(tmp_path, """\
        myhostname = "mx.test"
        smtpd_recipient_restrictions = [
            "permit_mynetworks",
            "reject_unauth_destinaton",
        ]
        """)
    assert message == ('tern.toml:4: smtpd_recipient_restrictions: '
                       'unknown restriction "reject_unauth_destinaton"')
    assert exc.key == "smtpd_recipient_restrictions"


def test_malformed_table_names_the_table_file_and_line(tmp_path):
    (tmp_path / "access").write_text("good.test OK\nbroken\n")
    message, _ = error(tmp_path, f"""\
        smtpd_sender_restrictions = "check_sender_access texthash:{tmp_path}/access"
        """)
    assert message == (f'tern.toml:1: smtpd_sender_restrictions: "check_sender_access '
                       f'texthash:{tmp_path}/access": {tmp_path}/access:2: '
                       'expected "key value", got "broken"')


def test_missing_table_is_an_error(tmp_path):
    message, _ = error(tmp_path, 'smtpd_client_restrictions = "check_client_access"\n')
    assert message.startswith('tern.toml:1: smtpd_client_restrictions: "check_client_access" '
                              "needs a table")


def test_open_relay_configuration_is_refused(tmp_path):
    """As Postfix: the relay or recipient list must hold reject_unauth_destination (or a
    plain reject/defer)."""
    message, _ = error(tmp_path, """\
        myhostname = "mx.test"
        smtpd_relay_restrictions = "permit_mynetworks"
        """)
    assert message.startswith("tern.toml:2: smtpd_relay_restrictions: in "
                              "smtpd_relay_restrictions or smtpd_recipient_restrictions, "
                              "specify at least one of reject_unauth_destination")
    _, config = load(tmp_path, """\
        smtpd_relay_restrictions = []
        smtpd_recipient_restrictions = "permit_mynetworks, reject_unauth_destination"
        """)
    assert config.smtpd_relay_restrictions == ()


@pytest.mark.parametrize("line, problem", [
    ("reject_code = 250", "reject_code: expected a 4xx or 5xx reply code, got 250"),
    ("defer_code = 550", "defer_code: expected a 4xx reply code, got 550"),
    ("access_map_reject_code = \"554\"",
     'access_map_reject_code: expected a 4xx or 5xx reply code, got "554"'),
    ("smtpd_delay_reject = \"no\"", 'smtpd_delay_reject: expected true or false, got "no"'),
    ("smtpd_data_restrictions = 5",
     "smtpd_data_restrictions: expected a list of restrictions, got 5"),
])
def test_bad_values(tmp_path, line, problem):
    message, _ = error(tmp_path, line + "\n")
    assert message == f"tern.toml:1: {problem}"


def test_restrictions_import_no_io_module():
    """The restriction machinery is pure: DNS comes in through the caller's resolver."""
    import subprocess
    import sys

    code = ("import sys, engine.policy.restrictions, engine.policy.access, engine.tables,"
            " engine.tables.text, engine.tables.cidr;"
            "print(sorted({'asyncio','socket','ssl','lmdb','dns','selectors'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
