"""Relay control: mynetworks may send anywhere; others only to our domains (not an open relay)."""

import ipaddress

import pytest

from engine.config import Config
from engine.policy.relay import check_local_recipient, check_relay

CONFIG = Config(myhostname="mx.example.test", relay_domains=("example.org",),
                mynetworks=(ipaddress.ip_network("127.0.0.0/8"),
                            ipaddress.ip_network("2001:db8::/32")))


@pytest.mark.parametrize("client, recipient", [
    ("127.0.0.1", "anyone@elsewhere.test"),
    ("2001:db8::5", "anyone@elsewhere.test"),
    ("::ffff:127.0.0.9", "anyone@elsewhere.test"),
    ("192.0.2.1", "user@example.org"),
    ("192.0.2.1", "user@sub.example.org"),
    ("192.0.2.1", "user@mx.example.test"),
    ("192.0.2.1", "user@localhost"),
])
def test_permitted(client, recipient):
    assert check_relay(client, recipient, CONFIG) is None


@pytest.mark.parametrize("recipient", [
    "user@elsewhere.test",
    "user@example.org.evil.test",
    "user@notexample.org",
    '"user@example.org"@evil.test',
    "user%example.org@evil.test",
])
def test_outside_client_cannot_relay(recipient):
    reply = check_relay("192.0.2.1", recipient, CONFIG)
    assert str(reply) == f"554 5.7.1 <{recipient}>: Relay access denied"


def test_default_configuration_is_not_an_open_relay():
    reply = check_relay("192.0.2.1", "user@elsewhere.test", Config(myhostname="h.test"))
    assert reply is not None and reply.code == 554


@pytest.mark.parametrize("recipient", ["user@mx.example.test", "user@LOCALHOST", "postmaster"])
def test_local_recipients_are_unknown_until_local_delivery_exists(recipient):
    reply = check_local_recipient(recipient, CONFIG)
    assert str(reply) == (f"550 5.1.1 <{recipient}>: Recipient address rejected: "
                          "User unknown in local recipient table")


def test_remote_recipients_are_not_local_policy_business():
    assert check_local_recipient("user@example.org", CONFIG) is None
