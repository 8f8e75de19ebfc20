"""Source address and HELO name of outgoing SMTP (Postfix's smtp_bind_address,
smtp_bind_address6, smtp_helo_name), per [transport.NAME], and IP pools chosen by destination
(transport_maps) or by sender (sender_dependent_default_transport_maps): what smtp-sink saw."""

import asyncio
import smtplib

import pytest
from test_delivery_smtp import request_to, run

from engine.config import Config
from engine.delivery import TransientFailure
from engine.delivery.smtp import deliver
from engine.dns import Resolver


def test_bind_address_and_helo_name_of_a_transport(smtp_sink):
    sink = smtp_sink()
    config = Config(
        myhostname="client.tern.test",
        transport={"out2": {"smtp_bind_address": "127.0.0.2", "smtp_helo_name": "out2.tern.test"}},
    )
    run(deliver(request_to("127.0.0.1", sink.port), config, Resolver(config)))
    run(deliver(request_to("127.0.0.1", sink.port), config.for_transport("out2"),
                Resolver(config)))
    assert {(m.client_addr, m.helo) for m in sink.wait_messages(2)} == {
        ("127.0.0.1", "client.tern.test"),
        ("127.0.0.2", "out2.tern.test"),
    }


def test_bind_address6_for_an_ipv6_next_hop():
    """An IPv6 peer gets smtp_bind_address6, never the IPv4 smtp_bind_address (which could not
    be bound for it). ::1 is the only IPv6 loopback address, so a tiny server there that
    refuses the session (421) shows the connection was made, from ::1."""
    peers = []

    async def refuse(reader, writer):
        peers.append(writer.get_extra_info("peername")[0])
        writer.write(b"421 4.3.2 busy\r\n")
        await writer.drain()
        writer.close()

    async def attempt(config):
        server = await asyncio.start_server(refuse, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(TransientFailure) as info:
                await deliver(request_to("::1", port), config, Resolver(config))
        return info.value.text

    for bind6 in ("::1", ""):
        config = Config(myhostname="client.tern.test", smtp_bind_address="127.0.0.2",
                        smtp_bind_address6=bind6)
        text = run(attempt(config))
        assert text == "host ::1[::1] refused to talk to me: 421 4.3.2 busy"
    assert peers == ["::1", "::1"]


def test_bind_address_that_is_not_local_defers(smtp_sink):
    sink = smtp_sink()
    config = Config(myhostname="client.tern.test", smtp_bind_address="192.0.2.1")
    with pytest.raises(TransientFailure) as info:
        run(deliver(request_to("127.0.0.1", sink.port), config, Resolver(config)))
    assert info.value.text == (
        f"connect to 127.0.0.1[127.0.0.1]:{sink.port}: Cannot assign requested address"
    )


def test_ip_pools_by_sender_and_by_destination(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop, transport_maps={"dest.test": f"pool3:{sink.nexthop}"},
                  start=False)
    with server.config_file.open("a") as toml:
        toml.write(
            "[sender_dependent_default_transport_maps]\n"
            '"@pool2.test" = "pool2:"\n'
            "[transport.pool2]\n"
            'smtp_bind_address = "127.0.0.2"\n'
            'smtp_helo_name = "pool2.tern.test"\n'
            "[transport.pool3]\n"
            'smtp_bind_address = "127.0.0.3"\n'
        )
    server.start()
    with smtplib.SMTP(*server.address) as client:
        client.sendmail("a@pool2.test", ["b@y.test"], b"Subject: by sender\r\n\r\nx\r\n")
        client.sendmail("a@pool2.test", ["c@dest.test"], b"Subject: by destination\r\n\r\nx\r\n")
        client.sendmail("a@other.test", ["d@y.test"], b"Subject: default\r\n\r\nx\r\n")
    server.wait_log("status=sent", count=3)
    seen = {m.recipients: (m.client_addr, m.helo) for m in sink.wait_messages(3)}
    assert seen == {
        ("b@y.test",): ("127.0.0.2", "pool2.tern.test"),
        ("c@dest.test",): ("127.0.0.3", "mx.tern.test"),
        ("d@y.test",): ("127.0.0.1", "mx.tern.test"),
    }
    log = server.log()
    assert "to=<b@y.test>, relay=" in log and "to=<c@dest.test>, relay=" in log
