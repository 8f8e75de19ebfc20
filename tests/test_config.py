"""engine.config: TOML loading, Postfix-style values, errors naming file:line: key."""

import dataclasses
import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path
from textwrap import dedent

import pytest
from tls_certs import make_certs

from engine.config import (
    Config,
    ConfigError,
    Listener,
    load_config,
    parse_dns_server,
    parse_duration,
    parse_nexthop,
    settings,
)
from engine.ipliteral import parse_ip

net = ipaddress.ip_network

EXAMPLE = """\
myhostname = "mx1.example.test"
queue_directory = "/var/spool/tern"
mynetworks = ["127.0.0.0/8", "::1/128"]
relay_domains = ["example.org"]
relayhost = "[127.0.0.1]:10026"      # [host]:port = no MX lookup, as in Postfix
message_size_limit = 10240000
maillog_file = "/var/log/tern.log"    # default: stderr
[transport_maps]
"example.net" = "smtp:[127.0.0.1]:10027"
[[listen]]
address = "127.0.0.1:10025"
service = "smtp"
"""

# Sets every key Config has (but config_file); test_full_file_sets_every_field keeps it so.
FULL = """\
myhostname = "MX1.Example.Test"
mydomain = "example.test"
mydestination = ["$myhostname", "localhost", "$mydomain"]
queue_directory = "/var/spool/tern"
mynetworks = "127.0.0.0/8, [::1]/128 10.1.2.3/8"
relay_domains = "example.org example.com"
relayhost = "smarthost.example.test:587"
maillog_file = "/var/log/tern.log"
smtpd_banner = "$myhostname ESMTP"
message_size_limit = 1000
hopcount_limit = 30
proxy_interfaces = "192.0.2.25"
smtpd_recipient_limit = 10
line_length_limit = 1000
smtpd_timeout = "1m"
smtpd_connection_limit = 500
smtpd_upstream_proxy_timeout = "2s"
smtpd_authorized_xclient_hosts = "127.0.0.2/32"
smtpd_authorized_xforward_hosts = ["127.0.0.3", "[::1]"]
smtpd_sasl_auth_enable = true
smtpd_tls_auth_only = false
smtpd_sasl_password_file = "/dev/null"
smtpd_client_auth_failure_limit = 3
smtpd_forbid_bare_newline = "reject"
smtpd_forbid_bare_newline_exclusions = "192.0.2.0/24"
smtpd_forbid_bare_newline_reject_code = 521
smtpd_forbid_unauth_pipelining = false
smtpd_soft_error_limit = 3
smtpd_error_sleep_time = "2s"
smtpd_hard_error_limit = 5
smtpd_per_request_deadline = false
smtpd_min_data_rate = 1000
smtpd_client_connection_count_limit = 10
smtpd_client_connection_rate_limit = 30
smtpd_client_message_rate_limit = 100
smtpd_client_recipient_rate_limit = 1000
smtpd_client_event_limit_exceptions = ["192.0.2.0/24"]
anvil_rate_time_unit = "2m"
worker_count = 3
minimal_backoff_time = "10m"
maximal_backoff_time = "1h"
maximal_queue_lifetime = "2d"
queue_run_delay = "1m"
bounce_queue_lifetime = "1d"
delay_warning_time = "4h"
qmgr_message_active_limit = 100
initial_destination_concurrency = 2
default_destination_concurrency_limit = 5
default_destination_concurrency_failed_cohort_limit = 3
default_destination_rate_delay = "1s"
default_destination_recipient_limit = 7
2bounce_notice_recipient = "hostmaster"
bounce_size_limit = 1000
notify_classes = ["2bounce", "resource"]
queue_commit_window = 0
queue_map_size = 1048576
queue_map_size_limit = 2097152
smtp_connection_cache_time_limit = "5s"
smtp_connection_reuse_time_limit = "1m"
smtp_connection_reuse_count_limit = 10
smtp_helo_name = "out.example.test"
smtp_connect_timeout = "10s"
smtp_helo_timeout = "1m"
smtp_mail_timeout = "1m"
smtp_rcpt_timeout = "1m"
smtp_data_init_timeout = "1m"
smtp_data_xfer_timeout = "1m"
smtp_data_done_timeout = "1w"
smtp_quit_timeout = 1.5
smtp_rset_timeout = "5s"
smtp_discard_ehlo_keywords = ["chunking", "pipelining"]
lmtp_lhlo_name = "lmtp.example.test"
lmtp_connect_timeout = "5s"
lmtp_lhlo_timeout = "2m"
lmtp_mail_timeout = "2m"
lmtp_rcpt_timeout = "2m"
lmtp_data_init_timeout = "3m"
lmtp_data_xfer_timeout = "4m"
lmtp_data_done_timeout = "20m"
lmtp_quit_timeout = "2m"
lmtp_rset_timeout = "2m"
lmtp_discard_lhlo_keywords = ["chunking"]
disable_mime_output_conversion = true
smtp_bind_address = "192.0.2.1"
smtp_bind_address6 = "2001:db8::1"
smtp_address_preference = "ipv6"
smtp_mx_address_limit = 0
smtp_mx_session_limit = 3
dns_attempts = 3
smtp_tls_security_level = "may"
smtp_tls_policy_maps = "inline:{ example.com=secure }"
smtp_tls_wrappermode = true
smtp_tls_CAfile = "@CERTS@/ca.pem"
smtp_tls_CApath = "@CERTS@"
tls_append_default_CA = true
tls_medium_cipherlist = "aNULL:-aNULL:HIGH:MEDIUM:@STRENGTH"
smtp_tls_protocols = ">=TLSv1.3"
smtp_starttls_timeout = "1m"
smtp_tls_fingerprint_digest = "sha512"
smtp_tls_verify_cert_match = "hostname, nexthop"
smtp_tls_secure_cert_match = "nexthop"
smtp_mta_sts_enable = true
smtp_mta_sts_CAfile = "@CERTS@/ca.pem"
smtp_mta_sts_https_port = 8443
smtp_tlsrpt_enable = true
tlsrpt_organization_name = "Example Mail"
tlsrpt_contact_info = "tls-reports@example.test"
tlsrpt_sender_address = "tlsrpt@example.test"
tlsrpt_CAfile = "@CERTS@/ca.pem"
dns_servers = ["192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53", "2001:db8::54"]
dns_timeout = 2.5
smtpd_tls_cert_file = "@CERTS@/default.crt"
smtpd_tls_key_file = "@CERTS@/default.key"
smtpd_tls_security_level = "encrypt"
smtpd_tls_protocols = ">=TLSv1.3"
tls_high_cipherlist = "ECDHE-ECDSA-AES256-GCM-SHA384"
smtpd_client_restrictions = "permit_mynetworks, reject"
smtpd_helo_restrictions = ["reject_invalid_helo_hostname", "reject_non_fqdn_helo_hostname"]
smtpd_sender_restrictions = "reject_non_fqdn_sender"
smtpd_relay_restrictions = "permit_mynetworks reject_unauth_destination"
smtpd_recipient_restrictions = "check_recipient_access inline:{ a@b.test=OK, c.test=REJECT }"
smtpd_data_restrictions = "permit"
smtpd_delay_reject = false
smtpd_reject_unlisted_recipient = false
smtpd_null_access_lookup_key = "<null>"
parent_domain_matches_subdomains = "relay_domains"
access_map_reject_code = 550
access_map_defer_code = 451
reject_code = 550
defer_code = 451
relay_domains_reject_code = 550
unknown_address_reject_code = 550
unknown_hostname_reject_code = 550
unknown_local_recipient_reject_code = 450
unknown_virtual_mailbox_reject_code = 450
non_fqdn_reject_code = 550
invalid_hostname_reject_code = 550
recipient_delimiter = "+"
home_mailbox = "Maildir/"
mail_spool_directory = "/var/spool/mail"
virtual_mailbox_domains = "virtual.example.test"
virtual_mailbox_base = "/srv/vmail"
virtual_mailbox_maps = "texthash:/etc/tern/vmailbox"
virtual_uid_maps = "static:5000"
virtual_gid_maps = "static:5000"
virtual_minimum_uid = 1000
deliver_lock_attempts = 5
deliver_lock_delay = "2s"
alias_maps = ["inline:{ postmaster=root }"]
forward_path = ["$home/.forward"]
allow_mail_to_commands = ["alias"]
allow_mail_to_files = ["alias", "forward", "include"]
default_privs = "daemon"
command_time_limit = "10m"
duplicate_filter_limit = 50
smtp_sasl_auth_enable = true
smtp_sasl_password_maps = "inline:{ [smarthost.example.test]:587=relayuser:secret }"
smtp_sasl_mechanism_filter = "login, PLAIN"
smtp_sasl_security_options = "noanonymous"
smtp_sasl_tls_security_options = ["noanonymous", "noplaintext"]
smtp_sasl_auth_soft_bounce = false
smtp_sender_dependent_authentication = true
empty_address_relayhost_maps_lookup_key = "<null>"

[sender_dependent_relayhost_maps]
"@Example.org" = "[relay2.example.test]:587"
"<null>" = "bounces.example.test"

[pipe_transports.filter]
argv = ["/usr/bin/filter", "-f", "${sender}", "--", "${recipient}"]
user = "nobody"
time_limit = "5m"
flags = "DRhu"

[tls_server_sni_maps]
"mail.example.org" = "@CERTS@/sni-mail.example.org.pem"

[transport_maps]
"Example.NET" = "smtp:[127.0.0.1]:10027"
".example.net" = "relay:mx.example.net:2525"
"example.com" = "smtp:"
"*" = "smtp:[::1]:25"

[sender_dependent_default_transport_maps]
"@example.org" = "out2:"

[transport.out2]
smtp_bind_address = "192.0.2.2"
smtp_bind_address6 = "2001:db8::2"
smtp_helo_name = "out2.example.test"

[[listen]]
address = "[::1]:2525"

[[listen]]
address = "localhost:0"
service = "smtp"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tern.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> tuple[ConfigError, str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value, str(path)


# -- loading -------------------------------------------------------------------------------------


def test_example_file_loads(tmp_path):
    path = write(tmp_path, EXAMPLE)
    config = load_config(path)
    assert config.config_file == str(path)
    assert config.myhostname == "mx1.example.test"
    assert config.queue_directory == Path("/var/spool/tern")
    assert config.mynetworks == (net("127.0.0.0/8"), net("::1/128"))
    assert config.relay_domains == ("example.org",)
    assert config.relayhost == "[127.0.0.1]:10026"
    assert parse_nexthop(config.relayhost) == ("127.0.0.1", 10026, False)
    assert config.message_size_limit == 10240000
    assert config.maillog_file == "/var/log/tern.log"
    assert config.transport_maps == {"example.net": "smtp:[127.0.0.1]:10027"}
    assert config.listen == (Listener(host="127.0.0.1", port=10025, service="smtp"),)
    # everything else keeps its default
    assert config.smtpd_timeout == 300.0
    assert config.mydestination == ("$myhostname", "localhost")


def test_importing_config_imports_no_io_module():
    """The sans-I/O cores import engine.config; socket comes only with the myhostname default."""
    code = "import sys, engine.config; print(sorted({'socket', 'selectors'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_str_and_pathlike_give_the_same_config(tmp_path):
    path = write(tmp_path, EXAMPLE)
    assert load_config(str(path)) == load_config(path)


def test_embedded_defaults():
    config = load_config()
    assert config == load_config(None) == Config()
    assert config.config_file == ""
    assert config.listen == (Listener(host="127.0.0.1", port=2525, service="smtp"),)
    assert config.mynetworks == (net("127.0.0.0/8"), net("::1/128"))
    # not an open relay: no relay domains, only loopback clients may relay
    assert config.relay_domains == ()
    assert not any(ipaddress.ip_address("192.0.2.1") in n for n in config.mynetworks)
    assert config.relayhost == ""
    assert config.transport_maps == {}
    assert config.message_size_limit == 10240000


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path, "# nothing set\n")
    assert load_config(path) == dataclasses.replace(Config(), config_file=str(path))


def test_tern_home_sets_default_queue_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
    assert load_config().queue_directory == tmp_path / "home" / "spool"
    assert load_config(write(tmp_path, "")).queue_directory == tmp_path / "home" / "spool"
    monkeypatch.delenv("TERN_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert load_config().queue_directory == tmp_path / "data" / "tern" / "spool"


def test_full_file_sets_every_field(tmp_path):
    settable = {f.name for f in dataclasses.fields(Config)} - {"config_file"}
    assert {settings.KEY_ALIASES.get(key, key) for key in tomllib.loads(FULL)} == settable
    certs = make_certs(tmp_path / "certs")
    config = load_config(write(tmp_path, FULL.replace("@CERTS@", str(certs.directory))))
    defaults = Config()
    for name in settable:
        assert getattr(config, name) != getattr(defaults, name), name
    assert config.myhostname == "mx1.example.test"
    assert config.mynetworks == (net("127.0.0.0/8"), net("::1/128"), net("10.0.0.0/8"))
    assert config.relay_domains == ("example.org", "example.com")
    assert config.smtpd_timeout == 60.0
    assert config.maximal_queue_lifetime == 2 * 86400.0
    assert config.queue_commit_window == 0.0
    assert config.smtp_quit_timeout == 1.5
    assert config.smtp_data_done_timeout == 7 * 86400.0
    assert config.smtp_discard_ehlo_keywords == ("chunking", "pipelining")
    assert (config.lmtp_lhlo_name, config.lmtp_connect_timeout) == ("lmtp.example.test", 5.0)
    assert (config.lmtp_lhlo_timeout, config.lmtp_data_done_timeout) == (120.0, 1200.0)
    assert config.lmtp_discard_lhlo_keywords == ("chunking",)
    assert config.smtp_address_preference == "ipv6"
    assert (config.smtp_mx_address_limit, config.smtp_mx_session_limit) == (0, 3)
    assert config.dns_attempts == 3
    assert config.disable_mime_output_conversion is True
    assert (config.smtp_bind_address, config.smtp_bind_address6) == ("192.0.2.1", "2001:db8::1")
    assert config.sender_dependent_default_transport_maps == {"@example.org": "out2:"}
    assert config.sender_dependent_relayhost_maps == {
        "@example.org": "[relay2.example.test]:587", "<null>": "bounces.example.test"}
    assert config.smtp_sasl_mechanism_filter == ("LOGIN", "PLAIN")
    assert config.smtp_sasl_security_options == ("noanonymous",)
    assert config.smtp_sasl_tls_security_options == ("noanonymous", "noplaintext")
    assert config.transport == {"out2": {"smtp_bind_address": "192.0.2.2",
                                         "smtp_bind_address6": "2001:db8::2",
                                         "smtp_helo_name": "out2.example.test"}}
    assert config.dns_servers[1] == "192.0.2.54:5353"
    assert config.transport_maps == {
        "example.net": "smtp:[127.0.0.1]:10027",
        ".example.net": "relay:mx.example.net:2525",
        "example.com": "smtp:",
        "*": "smtp:[::1]:25",
    }
    assert config.pipe_transports == {"filter": settings.PipeTransport(
        ("/usr/bin/filter", "-f", "${sender}", "--", "${recipient}"), "nobody", 300.0, "DRhu")}
    assert config.virtual_domains == {"virtual.example.test"}
    assert config.listen == (
        Listener(host="::1", port=2525, service="smtp"),
        Listener(host="localhost", port=0, service="smtp"),
    )


def test_float_fields_are_durations(tmp_path):
    floats = [f.name for f in dataclasses.fields(Config) if f.type is float]
    suffixes = ("_time", "_timeout", "_delay", "_window", "_lifetime", "_time_limit", "_time_unit")
    assert floats and all(name.endswith(suffixes) for name in floats)
    config = load_config(write(tmp_path, "".join(f'{name} = "2m"\n' for name in floats)))
    assert all(getattr(config, name) == 120.0 for name in floats)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("mydestination", '"localhost"', ("localhost",)),
        ("mydestination", '"$myhostname, localhost  example.com"',
         ("$myhostname", "localhost", "example.com")),
        ("relay_domains", '"Example.ORG"', ("example.org",)),
        ("relay_domains", "[]", ()),
        ("mynetworks", '"10.0.0.0/8"', (net("10.0.0.0/8"),)),
        ("mynetworks", '["192.0.2.7", "[2001:db8::]/32"]',
         (net("192.0.2.7/32"), net("2001:db8::/32"))),
        ("dns_servers", '"192.0.2.53, 192.0.2.54"', ("192.0.2.53", "192.0.2.54")),
    ],
)  # fmt: skip
def test_list_forms(tmp_path, key, value, expected):
    assert getattr(load_config(write(tmp_path, f"{key} = {value}\n")), key) == expected


def test_listen_services_are_easy_to_extend(tmp_path, monkeypatch):
    text = '[[listen]]\naddress = "127.0.0.1:24"\nservice = "lmtp"\n'
    with pytest.raises(ConfigError, match="lmtp"):
        load_config(write(tmp_path, text))
    monkeypatch.setattr(settings, "LISTEN_SERVICES", frozenset({"smtp", "lmtp"}))
    assert load_config(write(tmp_path, text)).listen == (Listener("127.0.0.1", 24, "lmtp"),)


def test_message_size_limit_zero_means_no_limit(tmp_path):
    assert load_config(write(tmp_path, "message_size_limit = 0\n")).message_size_limit == 0


@pytest.mark.parametrize("helo", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]"])
def test_helo_name_may_be_an_rfc5321_address_literal(tmp_path, helo):
    config = load_config(write(tmp_path, f'smtp_helo_name = "{helo}"\n'))
    assert config.smtp_helo_name == helo


def test_lmtp_keys_are_validated(tmp_path):
    """Postfix's lmtp_* twins: lmtp_connect_timeout may be 0 (the system's limit), the other
    timeouts may not; lmtp_lhlo_name is checked as smtp_helo_name is."""
    assert load_config(write(tmp_path, "lmtp_connect_timeout = 0\n")).lmtp_connect_timeout == 0
    assert Config().lmtp_connect_timeout == 0 and Config().lmtp_data_done_timeout == 600
    error, path = config_error(tmp_path, 'myhostname = "a.test"\nlmtp_lhlo_timeout = 0\n')
    assert str(error) == (f"{path}:2: lmtp_lhlo_timeout: expected a duration greater than 0,"
                          " got 0")
    error, path = config_error(tmp_path, 'lmtp_data_done_timeout = "soon"\n')
    assert str(error).startswith(f"{path}:1: lmtp_data_done_timeout: ")
    error, path = config_error(tmp_path, 'lmtp_lhlo_name = "bad name"\n')
    assert str(error).startswith(f"{path}:1: lmtp_lhlo_name: expected a host name")
    config = load_config(write(tmp_path, 'lmtp_lhlo_name = "$mydomain"\nmyhostname = "h.a.test"\n'))
    assert config.expand(config.lmtp_lhlo_name) == "a.test"


def test_alias_keys_are_validated(tmp_path):
    """alias_maps written in the file are read at start-up (a missing or malformed aliases(5)
    file names itself); the default /etc/aliases may be absent."""
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nteam: a, b,\n  c\n")
    config = load_config(write(tmp_path, f'alias_maps = "texthash:{aliases}"\n'))
    assert config.alias_maps == (f"texthash:{aliases}",)
    assert Config().alias_maps == ("texthash:/etc/aliases",)
    assert Config().allow_mail_to_commands == ("alias", "forward")
    error, path = config_error(tmp_path, f'alias_maps = "texthash:{tmp_path}/none"\n')
    assert str(error) == (f"{path}:1: alias_maps: {tmp_path}/none: cannot read: No such file "
                          "or directory")
    aliases.write_text("postmaster root\n")
    error, path = config_error(tmp_path, f'alias_maps = "texthash:{aliases}"\n')
    assert str(error) == (f'{path}:1: alias_maps: {aliases}:1: expected "name: value", got '
                          '"postmaster root"')
    error, path = config_error(tmp_path, 'alias_maps = "texthash:etc/aliases"\n')
    assert "alias_maps: bad entry" in str(error) and "absolute path" in str(error)
    error, path = config_error(tmp_path, 'allow_mail_to_commands = ["alias", "everyone"]\n')
    assert 'expected "alias", "forward" or "include"' in str(error)
    error, path = config_error(tmp_path, 'default_privs = "root"\n')
    assert str(error) == f'{path}:1: default_privs: "root" is a privileged user (Postfix ' \
                         'refuses it too)'
    error, path = config_error(tmp_path, 'forward_path = ["~/.forward"]\n')
    assert "absolute path" in str(error)


def test_ipv6_tag_in_listen_address(tmp_path):
    text = '[[listen]]\naddress = "[IPv6:0:0::1]:2525"\n'
    assert load_config(write(tmp_path, text)).listen == (Listener("::1", 2525, "smtp"),)


# -- parse_duration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("300s", 300.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1.5h", 5400.0),
        ("0.002s", 0.002),
        ("120", 120.0),
        (" 7s ", 7.0),
        ("0", 0.0),
        (45, 45.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, "-5s", "-1", "5x", "5M", "s", "", "1 h", "1e3", "ten", "5m30s", True, None, [5],
     float("inf"), float("nan"), "9" * 400, 10**400],
)  # fmt: skip
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


# -- parse_nexthop / parse_dns_server ------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", ("", None, True)),
        ("example.com", ("example.com", None, True)),
        ("MX.Example.com:2525", ("mx.example.com", 2525, True)),
        ("[mail.example.com]", ("mail.example.com", None, False)),
        ("[127.0.0.1]", ("127.0.0.1", None, False)),
        ("[127.0.0.1]:10026", ("127.0.0.1", 10026, False)),
        ("[::1]:25", ("::1", 25, False)),
        ("[2001:DB8::1]", ("2001:db8::1", None, False)),
        ("[ipv6:2001:db8::1]:25", ("2001:db8::1", 25, False)),
        ("[IPv6:2001:DB8::1]:25", ("2001:db8::1", 25, False)),
        ("[IPv6:::ffff:192.0.2.1]", ("::ffff:c000:201", None, False)),
    ],
)
def test_parse_nexthop(value, expected):
    assert parse_nexthop(value) == expected


@pytest.mark.parametrize(
    "value",
    ["[127.0.0.1", "127.0.0.1]", "[]", "[]:25", "host:", "host:0", "host:65536", "host:smtp",
     "host:-1", "[host]:", "[host]:25:26", "::1", "192.0.2.1", "192.0.2.1:25", "bad_host",
     "a b", "host.", "-host", "[ipv6:192.0.2.1]", "[IPv6:]", "[1.2.3]", "[a]b", "[::1]]",
     "example.com,other.example", None],
)  # fmt: skip
def test_parse_nexthop_rejects(value):
    with pytest.raises(ValueError):
        parse_nexthop(value)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
        ("[192.0.2.53]", ("192.0.2.53", 53)),
        ("[IPv6:2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ],
)
def test_parse_dns_server(value, expected):
    assert parse_dns_server(value) == expected


@pytest.mark.parametrize(
    "value",
    ["dns.example", "192.0.2.53:", "192.0.2.53:0", "[::1]:x", "", "[IPv6:192.0.2.53]", "[1.2.3]"],
)
def test_parse_dns_server_rejects(value):
    with pytest.raises(ValueError):
        parse_dns_server(value)


LITERALS = ["[192.0.2.1]", "[2001:db8::1]", "[IPv6:2001:db8::1]", "[ipv6:2001:DB8::1]",
            "[IPv6:::ffff:192.0.2.1]", "[IPv6:192.0.2.1]", "[1.2.3]", "[IPv6:]", "[]",
            "[::1::2]", "[256.0.0.1]"]  # fmt: skip


@pytest.mark.parametrize("literal", LITERALS)
def test_config_reads_ip_literals_as_engine_ipliteral_does(tmp_path, literal):
    """One parser: next hops, DNS servers and listeners agree with engine.ipliteral.parse_ip."""
    ip = parse_ip(literal)
    listen = f'[[listen]]\naddress = "{literal}:2525"\n'
    if ip is None:
        with pytest.raises(ValueError):
            parse_nexthop(f"{literal}:25")
        with pytest.raises(ValueError):
            parse_dns_server(f"{literal}:53")
        with pytest.raises(ConfigError, match="bad IPv6 address"):
            load_config(write(tmp_path, listen))
        return
    assert parse_nexthop(f"{literal}:25") == (str(ip), 25, False)
    assert parse_dns_server(f"{literal}:53") == (str(ip), 53)
    if ip.version == 6:
        assert load_config(write(tmp_path, listen)).listen == (Listener(str(ip), 2525),)


# -- errors: file:line: key ----------------------------------------------------------------------

ERRORS = [
    # (id, file text, line, key as named, part of the message)
    ("unknown top-level key", 'myhostname = "mx.example.test"\n\nmynetwork = ["10.0.0.0/8"]\n',
     3, "mynetwork", 'unknown key "mynetwork" (did you mean "mynetworks"?)'),
    ("unknown table", 'myhostname = "mx.example.test"\n[smtpd]\ntimeout = 5\n',
     2, "smtpd", 'unknown key "smtpd"'),
    ("config_file is not settable", '\nconfig_file = "/x"\n', 2, "config_file", "unknown key"),
    ("unknown key in [[listen]]",
     '[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\naddress = "127.0.0.1:26"\nadress = "x"\n',
     5, "listen.adress", 'unknown key "listen.adress" (did you mean "address"?)'),
    # int
    ("int: string", "\nsmtpd_recipient_limit = \"100\"\n", 2, "smtpd_recipient_limit",
     'expected an integer, got "100"'),
    ("int: float", "smtpd_recipient_limit = 10.5\n", 1, "smtpd_recipient_limit",
     "expected an integer, got 10.5"),
    ("int: bool", "\n\ndefault_destination_concurrency_limit = true\n", 3,
     "default_destination_concurrency_limit", "expected an integer, got true"),
    ("int: zero", "smtpd_recipient_limit = 0\n", 1, "smtpd_recipient_limit",
     "of at least 1, got 0"),
    ("int: negative size", "message_size_limit = -1\n", 1, "message_size_limit",
     "expected a size in bytes of at least 0, got -1"),
    ("int: below minimum", "line_length_limit = 100\n", 1, "line_length_limit", "at least 512"),
    ("int: no dns attempts", "dns_attempts = 0\n", 1, "dns_attempts", "of at least 1, got 0"),
    ("choice", 'smtp_address_preference = "ipv5"\n', 1, "smtp_address_preference",
     'expected one of "ipv4", "ipv6", "any", got "ipv5"'),
    # durations
    ("duration: junk", 'smtpd_timeout = "soon"\n', 1, "smtpd_timeout", "expected a duration"),
    ("duration: negative", "minimal_backoff_time = -5\n", 1, "minimal_backoff_time",
     "not negative"),
    ("duration: negative string", 'dns_timeout = "-1m"\n', 1, "dns_timeout", "not negative"),
    ("duration: zero", 'smtp_connect_timeout = "0s"\n', 1, "smtp_connect_timeout",
     "greater than 0"),
    ("duration: bool", "maximal_queue_lifetime = false\n", 1, "maximal_queue_lifetime",
     "got false"),
    ("duration: array", "minimal_backoff_time = [1]\n", 1, "minimal_backoff_time",
     "got an array"),
    ("backoff order", 'minimal_backoff_time = "1h"\nmaximal_backoff_time = "10m"\n', 2,
     "maximal_backoff_time", "less than minimal_backoff_time"),
    # strings
    ("string: int", "\nmaillog_file = 5\n", 2, "maillog_file",
     "expected a string, got 5"),
    ("string: control characters", 'smtpd_banner = "a\\r\\nb"\n', 1, "smtpd_banner",
     "control characters"),
    ("string: empty banner", 'smtpd_banner = ""\n', 1, "smtpd_banner", "non-empty"),
    ("myhostname: not a host name", 'myhostname = "not a host!"\n', 1, "myhostname",
     'expected a host name such as mx1.example.com, got "not a host!"'),
    ("myhostname: an address", 'myhostname = "192.0.2.1"\n', 1, "myhostname",
     "expected a host name"),
    ("myhostname: table", "[myhostname]\n", 1, "myhostname", "got a table"),
    ("mydomain: bad", 'mydomain = "-bad-.example"\n', 1, "mydomain", "expected a host name"),
    ("smtp_helo_name: bad", 'smtp_helo_name = "two words"\n', 1, "smtp_helo_name",
     "expected a host name"),
    ("smtp_helo_name: IPv6 literal without its tag", 'smtp_helo_name = "[::1]"\n', 1,
     "smtp_helo_name", "[IPv6:2001:db8::1]"),
    ("smtp_helo_name: bad IPv4 literal", 'smtp_helo_name = "[1.2.3]"\n', 1, "smtp_helo_name",
     "expected a host name or address literal"),
    ("smtp_helo_name: unknown variable", 'smtp_helo_name = "$myorigin"\n', 1, "smtp_helo_name",
     "$myhostname"),
    # Path
    ("path: relative", 'queue_directory = "spool"\n', 1, "queue_directory",
     'expected an absolute path, got "spool"'),
    ("path: int", "queue_directory = 5\n", 1, "queue_directory", "expected a string, got 5"),
    ("smtp_tls_CApath: relative", 'smtp_tls_CApath = "certs"\n', 1, "smtp_tls_CApath",
     'expected an absolute path, got "certs"'),
    ("tls_medium_cipherlist: no cipher", 'tls_medium_cipherlist = "NOTHING-AT-ALL"\n', 1,
     "tls_medium_cipherlist", 'no cipher matches "NOTHING-AT-ALL"'),
    ("tls_append_default_CA: string", 'tls_append_default_CA = "yes"\n', 1,
     "tls_append_default_CA", "expected true or false"),
    # lists
    ("list: int", "relay_domains = 5\n", 1, "relay_domains",
     "expected an array of domains (or one string), got 5"),
    ("list: non-string entry", 'relay_domains = ["example.org", 7]\n', 1, "relay_domains",
     "got an entry 7"),
    ("list: bad domain in string", 'relay_domains = "example.org, bad_domain"\n', 1,
     "relay_domains", 'bad entry "bad_domain"'),
    ("list: unknown variable", 'mydestination = ["$myhostname", "$myorigin"]\n', 1,
     "mydestination", 'bad entry "$myorigin"'),
    ("mynetworks: bad entry in multi-line array",
     'mynetworks = [\n  "127.0.0.0/8",  # loopback\n  "10.0.0.0/8",\n  "10.0.0.0/33",\n]\n',
     4, "mynetworks", 'bad entry "10.0.0.0/33"'),
    ("mynetworks: junk", 'mynetworks = "127.0.0.0/8 localhost"\n', 1, "mynetworks",
     'bad entry "localhost"'),
    ("dns_servers: name", 'dns_servers = [\n"192.0.2.53",\n"resolver.example"]\n', 3,
     "dns_servers", 'bad entry "resolver.example"'),
    # relayhost
    ("relayhost: unclosed bracket", 'relayhost = "[127.0.0.1"\n', 1, "relayhost",
     'expected "[host]" or "[host]:port"'),
    ("relayhost: bare address", 'relayhost = "192.0.2.1:25"\n', 1, "relayhost", "brackets"),
    ("relayhost: port", 'relayhost = "mx.example.com:99999"\n', 1, "relayhost",
     "port 99999 out of range"),
    # transport_maps
    ("transport_maps: bad next hop",
     'myhostname = "mx.example.test"\n[transport_maps]\n"example.org" = "smtp:"\n'
     '"example.net" = "smtp:[127.0.0.1]:port"\n', 4, 'transport_maps."example.net"',
     "bad next hop"),
    ("transport_maps: lmtp unix socket not absolute",
     '[transport_maps]\n"example.net" = "lmtp:unix:run/lmtp"\n', 2,
     'transport_maps."example.net"', "expected unix:/absolute/path"),
    ("pipe_transports: root", '[pipe_transports.filter]\nargv = ["/bin/cat"]\nuser = "root"\n',
     3, "pipe_transports.filter.user", "other than root"),
    ("pipe_transports: relative command",
     '[pipe_transports.filter]\nargv = ["cat"]\nuser = "nobody"\n', 2,
     "pipe_transports.filter.argv", "absolute path"),
    ("pipe_transports: builtin name",
     '[pipe_transports.local]\nargv = ["/bin/cat"]\nuser = "nobody"\n', 1,
     "pipe_transports.local", "bad transport name"),
    ("pipe_transports: unknown flag",
     '[pipe_transports.filter]\nargv = ["/bin/cat"]\nuser = "nobody"\nflags = "DX"\n', 4,
     "pipe_transports.filter.flags", "expected flags among"),
    ("virtual_mailbox_maps: not a table", 'virtual_mailbox_maps = "/etc/vmailbox"\n', 1,
     "virtual_mailbox_maps", '"type:name"'),
    ("transport_maps: bad transport name", '[transport_maps]\n"example.net" = "sm tp:host"\n', 2,
     'transport_maps."example.net"', 'bad transport name "sm tp"'),
    ("transport_maps: no colon", '[transport_maps]\n"example.net" = "smtp"\n', 2,
     'transport_maps."example.net"', 'expected "transport:nexthop", got "smtp"'),
    ("transport_maps: empty transport", '[transport_maps]\nlocalhost = ":[::1]"\n', 2,
     "transport_maps.localhost", "bad transport name"),
    ("transport_maps: not a string", '[transport_maps]\n\n"example.net" = 5\n', 3,
     'transport_maps."example.net"', "got 5"),
    ("transport_maps: bad domain", '[transport_maps]\n"exa mple" = "smtp:"\n', 2,
     'transport_maps."exa mple"', "expected a domain"),
    ("transport_maps: dotted key", 'myhostname = "a.example"\ntransport_maps.x = "smtp:[x"\n',
     2, "transport_maps.x", "bad next hop"),
    ("transport_maps: same domain twice", '[transport_maps]\n"a.example" = "smtp:"\n'
     '"A.example" = "smtp:"\n', 3, 'transport_maps."A.example"', "listed twice"),
    ("transport_maps: not a table", 'transport_maps = "smtp:x"\n', 1, "transport_maps",
     "expected a table"),
    # [[listen]]
    ("listen: no port", '[[listen]]\naddress = "127.0.0.1"\n', 2, "listen.address",
     'expected "host:port" or "[ipv6]:port", got "127.0.0.1"'),
    ("listen: unbracketed IPv6", '[[listen]]\naddress = "::1:25"\n', 2, "listen.address",
     "[::1]:25"),
    ("listen: bad port", '[[listen]]\nservice = "smtp"\naddress = "127.0.0.1:http"\n', 3,
     "listen.address", 'bad port "http"'),
    ("listen: bad host", '[[listen]]\naddress = "bad host:25"\n', 2, "listen.address",
     'bad host "bad host"'),
    ("listen: bad IPv6", '[[listen]]\naddress = "[127.0.0.1]:25"\n', 2, "listen.address",
     "bad IPv6 address"),
    ("listen: IPv4 in an IPv6 tag", '[[listen]]\naddress = "[IPv6:127.0.0.1]:25"\n', 2,
     "listen.address", "bad IPv6 address"),
    ("listen: bad service",
     '[[listen]]\naddress = "127.0.0.1:25"\nservice = "smtp"\n# [[listen]] service = "x"\n'
     '[[listen]]\naddress = "127.0.0.1:110"\nservice = "pop3"\n', 7, "listen.service",
     'expected one of "smtp", "smtps", "submission", got "pop3"'),
    ("listen: missing address", '[[listen]]\naddress = "127.0.0.1:25"\n\n[[listen]]\n'
     'service = "smtp"\n', 4, "listen", 'missing "address"'),
    ("listen: duplicate", '[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\n'
     'address = "127.0.0.1:25"\n', 4, "listen.address", "already in [[listen]] #1"),
    ("listen: not tables", 'listen = "127.0.0.1:25"\n', 1, "listen",
     "expected [[listen]] tables"),
    ("listen: inline table", '\nlisten = [{ address = "127.0.0.1" }]\n', 2, "listen.address",
     "got \"127.0.0.1\""),
    ("listen: empty", "\nlisten = []\n", 2, "listen", "at least one [[listen]]"),
    # TOML syntax
    ("syntax: missing value", 'myhostname = "a.example"\n\nmessage_size_limit = \n', 3, "",
     "TOML syntax error: Invalid value"),
    ("bind address family", 'smtp_bind_address = "::1"\n', 1, "smtp_bind_address",
     'expected an IPv4 address, got "::1"'),
    ("bind address6 junk", 'smtp_bind_address6 = "x"\n', 1, "smtp_bind_address6",
     'expected an IPv6 address, got "x"'),
    ("transport: not smtp_", '[transport.out2]\n\nmyhostname = "a.test"\n', 3,
     "transport.out2.myhostname", 'unknown key "myhostname" (an smtp_* setting)'),
    ("transport: bad value", '[transport.out2]\nsmtp_helo_name = "x"\nsmtp_bind_address = "1"\n',
     3, "transport.out2.smtp_bind_address", 'expected an IPv4 address, got "1"'),
    ("transport: bad name", '[transport."out 2"]\nsmtp_helo_name = "x"\n', 1,
     "transport", "bad transport name"),
    ("transport: bad smtp next hop",  # out2 speaks SMTP: its next hop is checked as smtp's
     '[transport_maps]\n"a.test" = "relay:"\n"x.test" = "out2:[mail.example:99999"\n'
     '[transport.out2]\nsmtp_helo_name = "x.test"\n', 3, 'transport_maps."x.test"',
     'bad next hop: expected "[host]" or "[host]:port"'),
    ("transport: bad port for an SMTP transport",
     '[transport.out2]\nsmtp_helo_name = "x.test"\n[sender_dependent_default_transport_maps]'
     '\n"@x.test" = "out2:[mail.example]:99999"\n', 4,
     'sender_dependent_default_transport_maps."@x.test"', "bad next hop"),
    ("transport: a built-in agent's name", 'myhostname = "h.test"\n[transport.local]\n'
     'smtp_helo_name = "x.test"\n', 2, "transport.local",
     '"local" is a built-in transport; give this SMTP transport another name'),
    ("transport: lmtp", '[transport.lmtp]\nsmtp_helo_name = "y.test"\n', 1, "transport.lmtp",
     '"lmtp" is a built-in transport'),
    ("transport: also a pipe transport",
     '[transport.p1]\nsmtp_helo_name = "y.test"\n[pipe_transports.p1]\n'
     'argv = ["/bin/cat"]\nuser = "nobody"\n', 1, "transport.p1",
     '"p1" is also a [pipe_transports] table'),
    ("sender map: bad key", '[sender_dependent_default_transport_maps]\n"x.test" = "out2:"\n',
     2, "sender_dependent_default_transport_maps", 'expected "user@domain" or "@domain"'),
    ("sender map: bad value", '[sender_dependent_default_transport_maps]\n"@x.test" = "out2"\n',
     2, "sender_dependent_default_transport_maps", 'expected "transport:nexthop"'),
    # client AUTH and sender-dependent relay hosts
    ("sasl: maps do not open", 'smtp_sasl_password_maps = "texthash:/nonexistent/sasl"\n', 1,
     "smtp_sasl_password_maps", "/nonexistent/sasl: cannot read"),
    ("sasl: maps not a table", 'smtp_sasl_password_maps = "hash:/etc/sasl"\n', 1,
     "smtp_sasl_password_maps", 'unsupported table type "hash"'),
    ("sasl: enabled without maps", 'myhostname = "a.test"\nsmtp_sasl_auth_enable = true\n', 2,
     "smtp_sasl_auth_enable", "needs smtp_sasl_password_maps"),
    ("sasl: enabled in a transport without maps",
     '[transport.out2]\nsmtp_helo_name = "x.test"\nsmtp_sasl_auth_enable = true\n', 3,
     "transport.out2.smtp_sasl_auth_enable", "needs smtp_sasl_password_maps"),
    ("sasl: bad option", 'smtp_sasl_security_options = "noanonymous, noplain"\n', 1,
     "smtp_sasl_security_options", 'bad entry "noplain": expected one of'),
    ("sasl: bad tls option", 'smtp_sasl_tls_security_options = ["x"]\n', 1,
     "smtp_sasl_tls_security_options", 'bad entry "x"'),
    ("sasl: filter without ours", 'smtp_sasl_mechanism_filter = "cram-md5"\n', 1,
     "smtp_sasl_mechanism_filter", "lets none of Tern's mechanisms through (PLAIN, LOGIN)"),
    ("sasl: filter junk", 'smtp_sasl_mechanism_filter = ["login", "lo gin"]\n', 1,
     "smtp_sasl_mechanism_filter", 'bad entry "lo gin"'),
    ("sender relayhost: bad value",
     '[sender_dependent_relayhost_maps]\n"@a.test" = "[relay"\n', 2,
     'sender_dependent_relayhost_maps."@a.test"', "bad relay host"),
    ("sender relayhost: bad key",
     '[sender_dependent_relayhost_maps]\n"@a.test" = "[relay.test]"\n"x y" = "[r.test]"\n', 3,
     'sender_dependent_relayhost_maps."x y"', 'expected "user@domain", "@domain" or "<>"'),
    ("sender relayhost: not the null key",
     '[sender_dependent_relayhost_maps]\n"@a.test" = "[relay.test]"\nnobody = "[r.test]"\n',
     3, "sender_dependent_relayhost_maps.nobody", "the null sender's key \"<>\""),
    ("syntax: duplicate key", 'message_size_limit = 1\nmessage_size_limit = 2\n', 2, "",
     "TOML syntax error: Cannot overwrite a value"),
    ("syntax: unterminated string", 'myhostname = "a.example"\nrelayhost = "x\n', 2, "",
     "TOML syntax error"),
]  # fmt: skip


@pytest.mark.parametrize(
    "text, line, key, fragment", [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS]
)
def test_errors_name_file_line_and_key(tmp_path, text, line, key, fragment):
    error, path = config_error(tmp_path, text)
    message = str(error)
    assert message.startswith(f"{path}:{line}: "), message
    assert key in message
    assert fragment in message
    assert "\n" not in message
    assert (error.file, error.line) == (path, line)


def test_error_message_format(tmp_path):
    error, path = config_error(tmp_path, '\nmessage_size_limit = "ten"\n')
    assert str(error) == f'{path}:2: message_size_limit: expected a size in bytes, got "ten"'
    assert error.key == "message_size_limit"
    error, path = config_error(tmp_path, 'myhostname = "a.example"\n\nmynetwork = []\n')
    assert str(error) == f'{path}:3: unknown key "mynetwork" (did you mean "mynetworks"?)'
    error, path = config_error(tmp_path, "a = 1\nb = \n")
    assert str(error) == f"{path}:2: TOML syntax error: Invalid value (column 5)"


def test_line_numbers_skip_decoys(tmp_path):
    """Keys named in comments, multi-line strings and arrays, or other tables are not mistaken
    for the key itself."""
    text = dedent('''\
        # message_size_limit = 1 (a comment)
        smtpd_banner = """$myhostname \\
            message_size_limit = 2 ESMTP"""
        mydestination = [
            "localhost",  # message_size_limit = 3
            'message-size-limit.example',
        ]
        'message_size_limit' = "many"
        [transport_maps]
        "message_size_limit.example" = "smtp:"
        ''')
    error, path = config_error(tmp_path, text)
    expected = f'{path}:8: message_size_limit: expected a size in bytes, got "many"'
    assert str(error) == expected


def test_unreadable_file(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read: ")
    assert info.value.line is None


def test_not_utf8(tmp_path):
    path = tmp_path / "tern.toml"
    path.write_bytes(b'myhostname = "a.example"\nsmtpd_banner = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2: not UTF-8 text"


def test_queue_manager_keys_with_postfix_names(tmp_path):
    path = tmp_path / "tern.toml"
    path.write_text('2bounce_notice_recipient = "hostmaster@example.test"\n'
                    'queue_run_delay = "1m"\ndelay_warning_time = "4h"\n'
                    'default_destination_rate_delay = "2s"\nqmgr_message_active_limit = 500\n'
                    'smtp_connection_cache_time_limit = "2s"\n')
    config = load_config(path)
    assert config.double_bounce_notice_recipient == "hostmaster@example.test"
    assert (config.queue_run_delay, config.delay_warning_time) == (60.0, 4 * 3600.0)
    assert config.default_destination_rate_delay == 2.0
    assert config.qmgr_message_active_limit == 500
    assert config.smtp_connection_cache_time_limit == 2.0


# -- AUTH keys -------------------------------------------------------------------------------


def test_auth_keys_defaults_and_values(tmp_path):
    defaults = Config()
    assert (defaults.smtpd_sasl_auth_enable, defaults.smtpd_tls_auth_only) == (False, True)
    assert defaults.smtpd_sasl_password_file == ""
    assert defaults.smtpd_client_auth_failure_limit == 5
    passwd = tmp_path / "passwd"
    passwd.write_text("# users\nalice:{PLAIN}secret\n")
    config = load_config(write(tmp_path, f'smtpd_sasl_auth_enable = true\n'
                                         f'smtpd_sasl_password_file = "{passwd}"\n'
                                         f'smtpd_client_auth_failure_limit = 0\n'))
    assert config.smtpd_sasl_auth_enable and config.smtpd_sasl_password_file == str(passwd)
    assert config.smtpd_client_auth_failure_limit == 0  # no limit


def test_submission_listener_is_a_known_service(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    config = load_config(write(tmp_path, f'smtpd_sasl_password_file = "{passwd}"\n[[listen]]\n'
                                         'address = "127.0.0.1:587"\nservice = "submission"\n'))
    assert config.listen == (Listener("127.0.0.1", 587, "submission"),)


@pytest.mark.parametrize("text, line, fragment", [
    ('smtpd_sasl_auth_enable = true\n', 1,
     "smtpd_sasl_password_file: required by smtpd_sasl_auth_enable = true"),
    ('myhostname = "a.test"\n[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\n'
     'address = "127.0.0.1:587"\nservice = "submission"\n', 6,
     'smtpd_sasl_password_file: required by [[listen]] service "submission"'),
    ('smtpd_sasl_password_file = "relative/passwd"\n', 1, "expected an absolute path"),
    ('smtpd_client_auth_failure_limit = -1\n', 1, "of at least 0"),
    ('smtpd_tls_auth_only = "no"\n', 1, "expected true or false"),
])  # fmt: skip
def test_auth_key_errors(tmp_path, text, line, fragment):
    error, path = config_error(tmp_path, text)
    assert error.line == line
    assert fragment in str(error)


@pytest.mark.parametrize("content, problem", [
    (None, ": cannot read: No such file or directory"),
    ("# ok\nalice:{PLAIN}x\nbob {PLAIN}y\n", ':3: expected "user:{SCHEME}hash"'),
    ("alice:{MD5-CRYPT}$1$abc$def\n", ":1: user alice: unknown password scheme {MD5-CRYPT}"),
])  # fmt: skip
def test_password_file_problems_stop_loading_naming_the_file(tmp_path, content, problem):
    passwd = tmp_path / "passwd"
    if content is not None:
        passwd.write_text(content)
    error, path = config_error(tmp_path, f'\nsmtpd_sasl_password_file = "{passwd}"\n')
    assert error.line == 2 and error.key == "smtpd_sasl_password_file"
    assert f"smtpd_sasl_password_file: {passwd}{problem}" in str(error)
def test_abuse_defence_keys_with_postfix_names_and_defaults(tmp_path):
    defaults = Config()
    assert defaults.smtpd_forbid_bare_newline == "normalize"
    assert defaults.bare_newline_exclusions == defaults.mynetworks  # $mynetworks
    assert defaults.event_limit_exceptions == defaults.mynetworks
    assert (defaults.smtpd_soft_error_limit, defaults.smtpd_hard_error_limit) == (10, 20)
    assert defaults.smtpd_error_sleep_time == 1.0
    assert defaults.smtpd_client_connection_count_limit == 50
    assert defaults.smtpd_client_connection_rate_limit == 0
    assert defaults.anvil_rate_time_unit == 60.0
    config = load_config(write(tmp_path, dedent("""\
        mynetworks = "10.0.0.0/8"
        smtpd_forbid_bare_newline = "YES"
        smtpd_forbid_bare_newline_exclusions = "$mynetworks"
        smtpd_client_event_limit_exceptions = []
        smtpd_error_sleep_time = 0
        smtpd_client_connection_count_limit = 0
        """)))
    assert config.smtpd_forbid_bare_newline == "normalize"
    assert config.bare_newline_exclusions == (net("10.0.0.0/8"),)
    assert config.event_limit_exceptions == ()
    assert config.smtpd_error_sleep_time == 0.0
    assert config.smtpd_client_connection_count_limit == 0


@pytest.mark.parametrize("text, fragment", [
    ('smtpd_forbid_bare_newline = "no"', 'expected "normalize" (or "yes") or "reject"'),
    ("smtpd_forbid_bare_newline_reject_code = 450", "expected a 5xx reply code"),
    ('smtpd_client_event_limit_exceptions = "not-a-net"', 'bad entry "not-a-net"'),
    ("smtpd_hard_error_limit = 0", "of at least 1"),
    ("smtpd_client_recipient_rate_limit = -1", "of at least 0"),
    ('anvil_rate_time_unit = "0s"', "greater than 0"),
])  # fmt: skip
def test_abuse_defence_keys_are_validated(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text + "\n"))
    assert ":1: " in str(caught.value) and fragment in str(caught.value)


# -- TLS (smtpd_tls_*, tls_server_sni_maps; the files are checked with pyOpenSSL) ----------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_text(certs, extra: str = "", *, cert=None, key=None) -> str:
    return (f'smtpd_tls_cert_file = "{cert or certs.default_cert}"\n'
            f'smtpd_tls_key_file = "{key or certs.default_key}"\n{extra}')


def test_tls_defaults_and_levels_per_service(tmp_path, certs):
    config = load_config(write(tmp_path, ""))
    assert config.smtpd_tls_protocols == ">=TLSv1.2"
    assert [config.tls_security_level(s) for s in ("smtp", "submission", "smtps")] == [
        "none", "none", "none"]  # no certificate: no STARTTLS anywhere
    config = load_config(write(tmp_path, tls_text(certs)))
    assert [config.tls_security_level(s) for s in ("smtp", "submission", "smtps")] == [
        "may", "encrypt", "none"]  # smtps is TLS from the first byte, not STARTTLS
    config = load_config(write(tmp_path, tls_text(certs, 'smtpd_tls_security_level = "none"\n')))
    assert config.tls_security_level("smtp") == "none"
    assert config.tls_security_level("submission") == "encrypt"  # as master.cf's -o override


def test_submission_and_smtps_listeners_load(tmp_path, certs):
    text = tls_text(certs, 'smtpd_sasl_password_file = "/dev/null"\n'  # submission: AUTH's
                           '[[listen]]\naddress = "127.0.0.1:587"\nservice = "submission"\n'
                           '[[listen]]\naddress = "127.0.0.1:465"\nservice = "smtps"\n')
    assert load_config(write(tmp_path, text)).listen == (
        Listener("127.0.0.1", 587, "submission"), Listener("127.0.0.1", 465, "smtps"))


def test_key_in_the_certificate_file_and_sni_entries_load(tmp_path, certs):
    pem = certs.sni["example.net"]
    text = (f'smtpd_tls_cert_file = "{pem}"\n[tls_server_sni_maps]\n"Example.NET" = "{pem}"\n'
            f'".example.net" = "{pem}"\n')
    config = load_config(write(tmp_path, text))
    assert config.smtpd_tls_key_file == ""  # Postfix's default: $smtpd_tls_cert_file
    assert config.tls_server_sni_maps == {"example.net": str(pem), ".example.net": str(pem)}


TLS_ERRORS = [
    # (id, text builder, line, key as named, part of the message)
    ("certificate file missing",
     lambda c, d: tls_text(c, cert=d / "none.pem"), 1, "smtpd_tls_cert_file",
     "none.pem: cannot read: No such file or directory"),
    ("certificate file holds a key",
     lambda c, d: tls_text(c, cert=c.default_key), 1, "smtpd_tls_cert_file",
     "default.key: no PEM certificate found"),
    ("key does not match",
     lambda c, d: tls_text(c, key=c.sni["example.net"]), 2, "smtpd_tls_key_file",
     "the private key does not match the certificate"),
    ("key file holds no key",
     lambda c, d: tls_text(c, key=c.ca), 2, "smtpd_tls_key_file", "ca.pem: no PEM private key"),
    ("level without certificate",
     lambda c, d: '\nsmtpd_tls_security_level = "encrypt"\n', 2, "smtpd_tls_security_level",
     '"encrypt" needs smtpd_tls_cert_file'),
    ("unknown level",
     lambda c, d: tls_text(c, 'smtpd_tls_security_level = "secure"\n'), 3,
     "smtpd_tls_security_level", 'expected one of "none", "may", "encrypt", got "secure"'),
    ("smtps without certificate",
     lambda c, d: '[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\n'
                  'address = "127.0.0.1:465"\nservice = "smtps"\n', 5, "listen.service",
     '"smtps" (implicit TLS) needs smtpd_tls_cert_file'),
    ("unknown protocol",
     lambda c, d: tls_text(c, 'smtpd_tls_protocols = ">=TLSv1.4"\n'), 3, "smtpd_tls_protocols",
     "unknown protocol 'TLSv1.4'"),
    ("protocols with a gap",
     lambda c, d: tls_text(c, 'smtpd_tls_protocols = "!SSLv2 !SSLv3 !TLSv1.2"\n'), 3,
     "smtpd_tls_protocols", "leaves a gap between TLSv1 and TLSv1.3"),
    ("no cipher",
     lambda c, d: tls_text(c, 'tls_high_cipherlist = "NOT-A-CIPHER"\n'), 3,
     "tls_high_cipherlist", 'no cipher matches "NOT-A-CIPHER"'),
    ("sni entry with a bad file",
     lambda c, d: tls_text(c, f'[tls_server_sni_maps]\n"example.org" = "{c.default_cert}"\n'),
     4, 'tls_server_sni_maps."example.org"', "default.crt: no PEM private key found"),
    ("sni entry with a relative path",
     lambda c, d: tls_text(c, '[tls_server_sni_maps]\n"example.org" = "sni.pem"\n'), 4,
     'tls_server_sni_maps."example.org"', 'expected the absolute path of a PEM file'),
    ("unknown outbound level",
     lambda c, d: '\nsmtp_tls_security_level = "daneonly"\n', 2, "smtp_tls_security_level",
     'expected one of "none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify",'
     ' "secure", got "daneonly"'),
    ("outbound policy table that does not open",
     lambda c, d: '\nsmtp_tls_policy_maps = "hash:/etc/tern/tls_policy"\n', 2,
     "smtp_tls_policy_maps", 'unsupported table type "hash"'),
    ("unknown fingerprint digest",
     lambda c, d: '\nsmtp_tls_fingerprint_digest = "md5"\n', 2,
     "smtp_tls_fingerprint_digest", 'expected "sha1", "sha256" or "sha512", got "md5"'),
    ("outbound protocols",
     lambda c, d: '\nsmtp_tls_protocols = ">=TLSv1.4"\n', 2, "smtp_tls_protocols",
     "unknown protocol 'TLSv1.4'"),
    ("sni without a default certificate",
     lambda c, d: f'\n[tls_server_sni_maps]\n"example.org" = "{c.sni["example.net"]}"\n', 2,
     "tls_server_sni_maps", "needs smtpd_tls_cert_file"),
]


@pytest.mark.parametrize("build, line, key, fragment",
                         [case[1:] for case in TLS_ERRORS], ids=[case[0] for case in TLS_ERRORS])
def test_tls_errors_name_file_line_and_key(tmp_path, certs, build, line, key, fragment):
    error, path = config_error(tmp_path, build(certs, tmp_path))
    message = str(error)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert fragment in message, message
    assert error.key == key
    assert "\n" not in message


def test_expired_certificate_loads(tmp_path, certs):
    """An expired certificate still encrypts (MTAs rarely verify); tern serve logs a warning
    (tests/test_tls_end_to_end.py) rather than refusing to start."""
    text = tls_text(certs, cert=certs.expired_cert, key=certs.expired_key)
    assert load_config(write(tmp_path, text)).smtpd_tls_cert_file == str(certs.expired_cert)


def test_transport_tables_override_smtp_settings(tmp_path):
    config = load_config(write(tmp_path, """\
smtp_helo_name = "main.tern.test"
smtp_bind_address6 = "::1"
[sender_dependent_default_transport_maps]
"@X.test" = "out2:"
"boss@y.test" = "out3:[relay.test]:2525"
[transport.out2]
smtp_bind_address = "127.0.0.2"
smtp_helo_name = "out2.tern.test"
smtp_connect_timeout = "5s"
[transport.out3]
smtp_bind_address = "127.0.0.3"
"""))
    assert config.sender_dependent_default_transport_maps == {
        "@x.test": "out2:", "boss@y.test": "out3:[relay.test]:2525"}
    out2 = config.for_transport("out2")
    assert (out2.smtp_bind_address, out2.smtp_bind_address6) == ("127.0.0.2", "::1")
    assert (out2.smtp_helo_name, out2.smtp_connect_timeout) == ("out2.tern.test", 5.0)
    out3 = config.for_transport("out3")
    assert (out3.smtp_bind_address, out3.smtp_helo_name) == ("127.0.0.3", "main.tern.test")
    assert config.for_transport("smtp") is config
    assert (config.smtp_bind_address, config.smtp_helo_name) == ("", "main.tern.test")


def test_hopcount_limit_defaults_to_postfix_50_and_must_be_positive(tmp_path):
    assert load_config(write(tmp_path, "")).hopcount_limit == 50
    assert load_config(write(tmp_path, "hopcount_limit = 20\n")).hopcount_limit == 20
    error, _ = config_error(tmp_path, "\nhopcount_limit = 0\n")
    assert error.line == 2 and error.key == "hopcount_limit"


def test_transport_named_smtp_overrides_the_smtp_agents_settings(tmp_path):
    # Postfix's "smtp unix … smtp -o smtp_helo_name=…": still the SMTP agent, not a clash
    config = load_config(write(tmp_path, '[transport.smtp]\nsmtp_helo_name = "out.test"\n'))
    assert config.for_transport("smtp").smtp_helo_name == "out.test"
