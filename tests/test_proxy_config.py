"""Configuration of the PROXY protocol and of XCLIENT/XFORWARD: a [[listen]] table's
``proxy_protocol``, ``smtpd_upstream_proxy_timeout`` and the authorized host lists (Postfix's
names and defaults), each checked with an error naming file, line and key."""

import ipaddress

import pytest

from engine.config import Config, ConfigError, Listener, load_config


def load(tmp_path, text):
    path = tmp_path / "tern.toml"
    path.write_text(text)
    return load_config(path)


def test_defaults_are_postfix_ones():
    config = Config()
    assert config.listen[0].proxy_protocol is False
    assert config.smtpd_upstream_proxy_timeout == 5.0
    assert config.smtpd_authorized_xclient_hosts == ()  # nobody, as Postfix
    assert config.smtpd_authorized_xforward_hosts == ()


def test_proxy_protocol_is_per_listener(tmp_path):
    config = load(tmp_path, '[[listen]]\naddress = "127.0.0.1:25"\n'
                            '[[listen]]\naddress = "127.0.0.1:10025"\nproxy_protocol = true\n'
                            '[[listen]]\naddress = "127.0.0.1:10026"\nproxy_protocol = false\n')
    assert config.listen == (Listener("127.0.0.1", 25, "smtp"),
                             Listener("127.0.0.1", 10025, "smtp", proxy_protocol=True),
                             Listener("127.0.0.1", 10026, "smtp"))


def test_timeout_and_host_lists_load(tmp_path):
    config = load(tmp_path, 'smtpd_upstream_proxy_timeout = "10s"\n'
                            'smtpd_authorized_xclient_hosts = "127.0.0.2/32, [::1]"\n'
                            'smtpd_authorized_xforward_hosts = ["192.0.2.0/24"]\n')
    assert config.smtpd_upstream_proxy_timeout == 10.0
    assert config.smtpd_authorized_xclient_hosts == (ipaddress.ip_network("127.0.0.2/32"),
                                                     ipaddress.ip_network("::1/128"))
    assert config.smtpd_authorized_xforward_hosts == (ipaddress.ip_network("192.0.2.0/24"),)


@pytest.mark.parametrize("text, line, key, fragment", [
    ('[[listen]]\naddress = "127.0.0.1:25"\n\nproxy_protocol = "yes"\n', 4,
     "listen.proxy_protocol", 'expected true or false, got "yes"'),
    ('[[listen]]\naddress = "127.0.0.1:25"\nproxy_protocl = true\n', 3,
     "listen.proxy_protocl", 'unknown key "listen.proxy_protocl" (did you mean "proxy_protocol"?)'),
    ('\nsmtpd_upstream_proxy_timeout = "soon"\n', 2, "smtpd_upstream_proxy_timeout",
     "expected a duration"),
    ("smtpd_upstream_proxy_timeout = 0\n", 1, "smtpd_upstream_proxy_timeout",
     "greater than 0"),
    ('smtpd_authorized_xclient_hosts = ["127.0.0.1", "mail.example"]\n', 1,
     "smtpd_authorized_xclient_hosts", 'bad entry "mail.example"'),
    ('\n\nsmtpd_authorized_xforward_hosts = "10.0.0.0/33"\n', 3,
     "smtpd_authorized_xforward_hosts", 'bad entry "10.0.0.0/33"'),
])
def test_bad_values_name_file_line_and_key(tmp_path, text, line, key, fragment):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'tern.toml'}:{line}: "), message
    assert error.value.key == key
    assert fragment in message
