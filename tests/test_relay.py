"""Relay control with the default restriction lists: mynetworks may send anywhere; others only
to our domains (not an open relay); local recipients are unknown until local delivery exists."""

import ipaddress

import pytest

from engine.config import Config
from engine.policy.relay import client_is_trusted
from engine.policy.restrictions import Facts, Policy, SessionChecks

CONFIG = Config(myhostname="mx.example.test", relay_domains=("example.org",),
                mynetworks=(ipaddress.ip_network("127.0.0.0/8"),
                            ipaddress.ip_network("2001:db8::/32")))


def rcpt(client: str, recipient: str, config: Config = CONFIG):
    return SessionChecks(Policy(config)).decide("RCPT", Facts(client, recipient=recipient))


@pytest.mark.parametrize("client, trusted", [
    ("127.0.0.1", True), ("2001:db8::5", True), ("::ffff:127.0.0.9", True),
    ("192.0.2.1", False), ("not an address", False),
])
def test_client_is_trusted(client, trusted):
    assert client_is_trusted(client, CONFIG) is trusted


@pytest.mark.parametrize("client, recipient", [
    ("127.0.0.1", "anyone@elsewhere.test"),
    ("2001:db8::5", "anyone@elsewhere.test"),
    ("::ffff:127.0.0.9", "anyone@elsewhere.test"),
    ("192.0.2.1", "user@example.org"),
    ("192.0.2.1", "user@sub.example.org"),
])
def test_permitted(client, recipient):
    assert rcpt(client, recipient) is None


@pytest.mark.parametrize("recipient", [
    "user@elsewhere.test",
    "user@example.org.evil.test",
    "user@notexample.org",
    '"user@example.org"@evil.test',
    "user%example.org@evil.test",
])
def test_outside_client_cannot_relay(recipient):
    assert str(rcpt("192.0.2.1", recipient)) == f"554 5.7.1 <{recipient}>: Relay access denied"


def test_default_configuration_is_not_an_open_relay():
    reply = rcpt("192.0.2.1", "user@elsewhere.test", Config(myhostname="h.test"))
    assert reply is not None and reply.code == 554


@pytest.mark.parametrize("client", ["127.0.0.1", "192.0.2.1"])
@pytest.mark.parametrize("recipient", ["nosuchuser9@mx.example.test", "nosuchuser9@LOCALHOST",
                                       "nosuchuser9"])
def test_local_recipients_not_in_passwd_are_unknown(client, recipient):
    assert str(rcpt(client, recipient)) == (
        f"550 5.1.1 <{recipient}>: Recipient address rejected: "
        "User unknown in local recipient table")


@pytest.mark.parametrize("client", ["127.0.0.1", "192.0.2.1"])
@pytest.mark.parametrize("recipient", ["nobody@mx.example.test", "NoBody+tag@localhost",
                                       "nobody"])
def test_local_recipients_in_passwd_are_accepted(client, recipient):
    config = Config(**{**CONFIG.__dict__, "recipient_delimiter": "+"})
    assert rcpt(client, recipient, config) is None


def test_virtual_mailbox_recipients(tmp_path):
    maps = tmp_path / "vmailbox"
    maps.write_text("ann@virtual.test virtual.test/ann/\n@catchall.test catchall/\n")
    config = Config(**{**CONFIG.__dict__,
                       "virtual_mailbox_domains": ("virtual.test", "catchall.test"),
                       "virtual_mailbox_maps": f"texthash:{maps}"})
    assert rcpt("192.0.2.1", "Ann@Virtual.test", config) is None
    assert rcpt("192.0.2.1", "anyone@catchall.test", config) is None
    assert str(rcpt("192.0.2.1", "bob@virtual.test", config)) == (
        "550 5.1.1 <bob@virtual.test>: Recipient address rejected: "
        "User unknown in virtual mailbox table")
    assert rcpt("192.0.2.1", "bob@elsewhere.test", config).code == 554  # not a relay
