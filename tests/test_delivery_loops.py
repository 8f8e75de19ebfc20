"""Mail loops in the SMTP client: MX hosts (or a next hop) that are this Tern itself, as
Postfix's smtp_addr.c: drop itself and every MX host not better than it, bounce "mail for X
loops back to myself" when nothing is left. Against unbound and smtp-sink on loopback, and a
real ``tern serve`` whose transport_maps points a domain back at its own listener."""

import smtplib
import time

import pytest
from peers import free_port
from tern_process import TernServer
from test_delivery_smtp import request_to, run

from engine.config import Config, Listener
from engine.delivery import PermanentFailure, TransientFailure
from engine.delivery.myself import Myself
from engine.delivery.smtp import deliver
from engine.dns import Resolver

THREE_MX = [
    "mx.test. 60 IN MX 10 mail1.mx.test.",
    "mx.test. 60 IN MX 20 mail2.mx.test.",
    "mx.test. 60 IN MX 30 mail3.mx.test.",
    "mail1.mx.test. 60 IN A 127.0.0.2",
    "mail2.mx.test. 60 IN A 127.0.0.3",
    "mail3.mx.test. 60 IN A 127.0.0.1",
]


def config_listening_on(dns_server, records, address, port, **settings):
    host, dns_port = dns_server(records)
    return Config(myhostname="client.tern.test", dns_servers=(f"{host}:{dns_port}",),
                  listen=(Listener(address, port),), **settings)


def test_mx_hosts_from_myself_on_are_dropped(dns_server, smtp_sink):
    worse = smtp_sink(host="127.0.0.1")  # mail3 (30): worse than this Tern (mail2, 20)
    config = config_listening_on(dns_server, THREE_MX, "127.0.0.3", worse.port)
    with pytest.raises(TransientFailure) as info:  # mail1 refuses; nothing else may be tried
        run(deliver(request_to("mx.test", worse.port, mx_lookup=True), config,
                    Resolver(config)))
    assert info.value.text == f"connect to mail1.mx.test[127.0.0.2]:{worse.port}: " \
        "Connection refused"
    assert worse.messages() == []


def test_best_mx_that_is_myself_bounces_as_a_loop(dns_server, smtp_sink):
    backup = smtp_sink(host="127.0.0.3")
    config = config_listening_on(dns_server, THREE_MX, "127.0.0.2", backup.port)
    with pytest.raises(PermanentFailure) as info:
        run(deliver(request_to("mx.test", backup.port, mx_lookup=True), config,
                    Resolver(config)))
    assert (info.value.dsn, info.value.text) == ("5.4.6", "mail for mx.test loops back to myself")
    assert backup.messages() == []


def test_better_mx_without_address_defers_unable_to_find_primary_relay(dns_server):
    records = ["mx.test. 60 IN MX 10 gone.mx.test.", "mx.test. 60 IN MX 20 mail2.mx.test.",
               "mail2.mx.test. 60 IN A 127.0.0.3"]
    port = free_port()
    config = config_listening_on(dns_server, records, "127.0.0.3", port)
    with pytest.raises(TransientFailure) as info:
        run(deliver(request_to("mx.test", port, mx_lookup=True), config, Resolver(config)))
    assert (info.value.dsn, info.value.text) == ("4.4.4",
                                                 "unable to find primary relay for mx.test")


@pytest.mark.parametrize("listen, hop", [
    ("127.0.0.1", "127.0.0.1"),
    ("0.0.0.0", "127.0.0.9"),  # a wildcard listener takes every address of this host
])
def test_next_hop_that_is_myself_bounces_as_a_loop(smtp_sink, listen, hop):
    sink = smtp_sink(host=hop)  # would take it: the check comes before any connection
    config = Config(myhostname="client.tern.test", listen=(Listener(listen, sink.port),))
    with pytest.raises(PermanentFailure) as info:
        run(deliver(request_to(hop, sink.port), config, Resolver(config)))
    assert (info.value.dsn, info.value.text) == ("5.4.6", f"mail for {hop} loops back to myself")
    assert sink.messages() == []


def test_myself_matches_listeners_wildcards_and_proxy_interfaces():
    config = Config(listen=(Listener("127.0.0.1", 2525), Listener("::", 2587),
                            Listener("localhost", 2600)),
                    proxy_interfaces=("192.0.2.25",))
    myself = Myself(config)
    assert ("127.0.0.1", 2525) in myself
    assert ("127.0.0.1", 25) not in myself and ("127.0.0.2", 2525) not in myself
    assert ("127.0.0.7", 2587) in myself and ("::1", 2587) in myself
    assert ("192.0.2.1", 2587) not in myself  # not an address of this host
    assert ("127.0.0.1", 2600) in myself  # "localhost", resolved once
    assert ("192.0.2.25", 25) in myself and ("192.0.2.25", 2525) not in myself


def test_transport_back_to_its_own_listener_bounces_at_once(tmp_path):
    server = TernServer(tmp_path, {"relay_domains": ["loop.test"]})
    with server.config_file.open("a") as f:
        f.write(f'[transport_maps]\n"loop.test" = "smtp:[127.0.0.1]:{server.port}"\n')
    server.start()
    try:
        with smtplib.SMTP(*server.address) as client:
            client.sendmail("a@x.test", ["u@loop.test"], b"Subject: loop\r\n\r\nx\r\n")
        deadline = time.monotonic() + 10
        while "to=<u@loop.test>" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log()
    finally:
        server.stop()
    assert "dsn=5.4.6, status=bounced (mail for 127.0.0.1 loops back to myself)" in log
    assert log.count("status=sent") == 0
