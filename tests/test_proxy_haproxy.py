"""HAProxy (Debian's) in front of a real ``tern serve`` on a proxy_protocol listener.

The client connects from 127.0.0.2 (or .4); HAProxy connects to Tern from another loopback
address and sends a PROXY v1 or v2 header. Tern must greet, log, judge relaying by and write
Received: for the client, never for HAProxy's own address.
"""

import smtplib
import socket

import pytest
from peers import free_port, haproxy  # noqa: F401 - haproxy is a fixture

RCPT = "user@example.net"  # not ours: relaying needs mynetworks


def start_tern(tern, sink, **settings):
    """Tern with its usual plain listener (the fixture's readiness probe uses it) plus a
    proxy_protocol listener; returns (server, proxy listener port)."""
    server = tern(start=False, relayhost=sink.nexthop, **settings)
    proxy_port = free_port()
    with server.config_file.open("a") as config:
        config.write(f'[[listen]]\naddress = "127.0.0.1:{proxy_port}"\nproxy_protocol = true\n')
    return server.start(), proxy_port


def send(route, client_ip, *, helo="client.test"):
    """One message through HAProxy from ``client_ip``; the RCPT reply code."""
    with smtplib.SMTP(route.host, route.port, local_hostname=helo, timeout=10,
                      source_address=(client_ip, 0)) as client:
        client.ehlo()
        client.mail("sender@example.org")
        code, _ = client.rcpt(RCPT)
        if code == 250:
            client.data(b"Subject: proxied\r\n\r\nhello\r\n")
        return code


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_proxied_client_is_the_one_tern_sees(tern, smtp_sink, haproxy, send_proxy):  # noqa: F811
    sink = smtp_sink()
    server, proxy_port = start_tern(tern, sink, mynetworks=["127.0.0.2/32"])
    allowed, denied = haproxy([
        (("127.0.0.1", proxy_port), "127.0.0.3", send_proxy),  # proxy not in mynetworks
        (("127.0.0.1", proxy_port), "127.0.0.2", send_proxy),  # proxy in mynetworks
    ])

    # the client 127.0.0.2 is in mynetworks, its proxy 127.0.0.3 is not: relay permitted
    assert send(allowed, "127.0.0.2") == 250
    log = server.wait_log("connect from unknown[127.0.0.2]")
    assert "connect from unknown[127.0.0.3]" not in log
    (message,) = sink.wait_messages(1, timeout=15)
    assert message.recipients == (RCPT,)
    received = message.content.split(b"\r\n", 2)[:2]
    assert received[0] == b"Received: from client.test (unknown [127.0.0.2])"
    assert received[1].startswith(b"\tby mx.tern.test (Tern) with ESMTP id ")

    # the client 127.0.0.4 is not, even though its proxy's address 127.0.0.2 is: refused
    assert send(denied, "127.0.0.4") == 554
    log = server.wait_log("reject: RCPT from unknown[127.0.0.4]: 554 5.7.1 <user@example.net>: "
                          "Relay access denied")
    assert "connect from unknown[127.0.0.4]" in log


def test_proxy_listener_refuses_a_client_without_header(tern, smtp_sink):
    server, proxy_port = start_tern(tern, smtp_sink(), smtpd_upstream_proxy_timeout="2s")
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as direct:
        direct.sendall(b"EHLO client.test\r\n")
        received = b""
        while chunk := direct.recv(4096):
            received += chunk
    assert received == b"421 4.3.0 mx.tern.test Server local error\r\n"
    server.wait_log("warning: haproxy read: unrecognized protocol header: EHLO client.test\\r\\n")
