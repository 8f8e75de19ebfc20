"""The per-RCPT restriction check: default lists (engine.policy.restrictions) against the
relay check they replaced (check_relay + check_local_recipient, kept below as the baseline).

Run: pytest bench/bench_restrictions.py --benchmark-enable -p no:cacheprovider
One round decides 1,000 recipients the way SmtpdProtocol._on_rcpt does — a Facts per RCPT,
then SessionChecks.decide("RCPT") — for an untrusted and a trusted client.
"""

import ipaddress
import random

import pytest

from engine.config import Config
from engine.policy.relay import client_is_trusted
from engine.policy.restrictions import Facts, Policy, SessionChecks
from engine.smtp.grammar import domain_of
from engine.smtp.replies import Reply, relay_denied

CONFIG = Config(myhostname="mx.example.test", relay_domains=("example.org", "example.com"),
                mynetworks=(ipaddress.ip_network("10.0.0.0/8"),
                            ipaddress.ip_network("127.0.0.0/8")))


# -- the baseline: engine/policy/relay.py before restriction lists (main at 3962312) ----------

def _domain_is_ours(domain, config):
    local = config.local_domains
    if domain in local:
        return True
    for relay in config.relay_domains:
        relay = relay.lower().lstrip(".")
        if domain == relay or domain.endswith("." + relay):
            return True
    return False


def _check_relay(client_ip, recipient, config, *, trusted=None):
    if client_is_trusted(client_ip, config) if trusted is None else trusted:
        return None
    if "@" not in recipient or _domain_is_ours(domain_of(recipient), config):
        return None
    return relay_denied(recipient)


def _check_local_recipient(recipient, config):
    if "@" in recipient and domain_of(recipient) not in config.local_domains:
        return None
    return Reply(550, f"5.1.1 <{recipient}>: Recipient address rejected: "
                      "User unknown in local recipient table")


def baseline(client_ip, recipients):
    trusted = client_is_trusted(client_ip, CONFIG)  # the session cached it at the first RCPT
    refused = 0
    for recipient in recipients:
        refusal = (_check_relay(client_ip, recipient, CONFIG, trusted=trusted)
                   or _check_local_recipient(recipient, CONFIG))
        refused += refusal is not None
    return refused


def restriction_lists(client_ip, recipients, checks):
    refused = 0
    for recipient in recipients:
        facts = Facts(client_ip, "unknown", "client.example.net", "a@example.net", recipient, "")
        refused += checks.decide("RCPT", facts) is not None
    return refused


def recipient_mix(count=1000):
    rng = random.Random(25)
    domains = ["example.org", "sub.example.com", "elsewhere.test", "mx.example.test"]
    return [f"user{n}@{rng.choice(domains)}" for n in range(count)]


@pytest.mark.parametrize("client", ["192.0.2.1", "10.1.2.3"], ids=["untrusted", "trusted"])
@pytest.mark.parametrize("implementation", ["baseline", "restrictions"])
def test_rcpt_decision(benchmark, client, implementation):
    recipients = recipient_mix()
    benchmark.group = f"1,000 RCPT decisions, default lists, {client}"
    if implementation == "baseline":
        refused = benchmark(baseline, client, recipients)
    else:
        checks = SessionChecks(Policy(CONFIG))
        refused = benchmark(restriction_lists, client, recipients, checks)
    assert refused == baseline(client, recipients)  # the same decisions
    assert 0 < refused < len(recipients)
