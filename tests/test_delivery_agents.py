"""engine.delivery.agents binds what a transport needs once, when the agents are built: each
[transport.NAME] SMTP transport (an IP pool) gets its TLS policy finder then, never one per
delivery, however many pools there are; the DNSSEC resolver is made only for DANE."""

import pytest
from test_delivery_smtp import run

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery.agents import build_agents
from engine.dns import Resolver
from engine.tls import client as tls_client

POOLS = 20


@pytest.fixture
def finders_made(monkeypatch):
    """How many PolicyFinders were made (each opens smtp_tls_policy_maps)."""
    made = []
    real = tls_client.PolicyFinder.__init__

    def init(self, config):
        made.append(config)
        real(self, config)

    monkeypatch.setattr(tls_client.PolicyFinder, "__init__", init)
    return made


def test_many_ip_pools_make_each_policy_finder_once(smtp_sink, finders_made):
    sink = smtp_sink()
    pools = {f"pool{n}": {"smtp_helo_name": f"out{n}.tern.test"} for n in range(POOLS)}
    config = Config(myhostname="client.tern.test", transport=pools)
    resolver = Resolver(config)
    agents = build_agents(config, resolver)

    async def deliver_all():
        outcomes = []
        for _ in range(2):
            for name in pools:
                request = DeliveryRequest("Q1", "a@x.test", ["b@y.test"],
                                          b"Subject: x\r\n\r\nhi\r\n",
                                          NextHop(name, "127.0.0.1", sink.port, False))
                outcomes.append(await agents[name](request))
        return outcomes

    outcomes = run(deliver_all())
    assert {r.status for outcome in outcomes for r in outcome.results} == {"sent"}
    assert len(finders_made) == POOLS + 1  # smtp's and one per pool, all at build time
    assert {c.smtp_helo_name for c in finders_made} == {"$myhostname"} | {
        f"out{n}.tern.test" for n in range(POOLS)}
    assert resolver._dnssec is None  # no DANE policy: no DNSSEC resolver (no resolv.conf read)
