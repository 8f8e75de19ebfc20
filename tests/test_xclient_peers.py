"""XCLIENT and XFORWARD from real peers to a real ``tern serve``: swaks' XCLIENT options, and a
throwaway Postfix whose smtp client forwards its own client with XFORWARD
(``smtp_send_xforward_command = yes``), as a content filter or relay in front of Tern would."""

import os
import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

RCPT = "user@example.net"  # not ours: relaying needs mynetworks


def swaks(server, *args):
    return subprocess.run(
        ["swaks", "--server", f"{server.address[0]}:{server.address[1]}", "--from",
         "sender@example.org", "--to", RCPT, "--helo", "proxy.test", "--timeout", "10", *args],
        capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_xclient_changes_who_tern_judges_and_records(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop, smtpd_authorized_xclient_hosts=["127.0.0.1/32"])

    # an outside address: no relaying for it, although the real peer is 127.0.0.1
    denied = swaks(server, "--xclient-addr", "192.0.2.7", "--xclient-name", "mail.example.org")
    assert "-> XCLIENT ADDR=192.0.2.7 NAME=mail.example.org\n<-  220 mx.tern.test ESMTP Tern" \
        in denied.stdout  # XCLIENT's new greeting
    assert "<** 554 5.7.1 <user@example.net>: Relay access denied" in denied.stdout
    server.wait_log("reject: RCPT from mail.example.org[192.0.2.7]: 554 5.7.1")

    # a loopback address with a login: relayed, and Received: names that client
    sent = swaks(server, "--xclient-addr", "127.0.0.9", "--xclient-name", "mail.example.org",
                 "--xclient-helo", "client.example", "--xclient-login", "alice")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (message,) = sink.wait_messages(1, timeout=15)
    received = message.content.split(b"\r\n", 2)[:2]
    assert received[0] == b"Received: from proxy.test (mail.example.org [127.0.0.9])"
    assert received[1].startswith(b"\tby mx.tern.test (Tern) with ESMTPA id ")
    server.wait_log("client=mail.example.org[127.0.0.9]")
    server.wait_log("disconnect from mail.example.org[127.0.0.9]")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_sees_no_xclient_from_an_unauthorized_host(tern):
    """(The 550 such a client gets if it tries anyway: tests/test_xclient*.py.)"""
    server = tern(smtpd_authorized_xclient_hosts=["127.0.0.2/32"])
    refused = swaks(server, "--xclient-addr", "192.0.2.7")
    assert refused.returncode != 0
    assert "Host did not advertise XCLIENT" in refused.stderr
    assert "-> XCLIENT" not in refused.stdout


def _postfix_instance():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from postfix_instance import PostfixInstance
    finally:
        sys.path.pop(0)
    return PostfixInstance


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/postfix"),
                    reason="a throwaway Postfix instance needs root and Postfix")
def test_postfix_xforward_names_its_client_in_tern_logs_and_received(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop, smtpd_authorized_xforward_hosts=["127.0.0.3/32"])
    postfix = _postfix_instance()(sink_port=server.port, maxproc=2)  # relays to Tern
    directory = postfix.build()
    with (directory / "main.cf").open("a") as main_cf:
        main_cf.write("smtp_send_xforward_command = yes\nsmtp_bind_address = 127.0.0.3\n")
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="origin.example",
                          timeout=10, source_address=("127.0.0.2", 0)) as client:
            client.sendmail("sender@example.org", [RCPT], b"Subject: filtered\r\n\r\nhi\r\n")
        (message,) = sink.wait_messages(1, timeout=30)
        postfix_log = postfix.log_tail(50)
    finally:
        postfix.stop()

    # Postfix's queue ID for the message, from its smtpd's "client=" line
    postfix_id = re.search(r"smtpd\[\d+\]: (\w+): client=\S*\[127\.0\.0\.2\]", postfix_log)[1]
    log = server.wait_log("orig_client=")
    # the session is Postfix's (127.0.0.3); the message is the original client's
    assert re.search(rf": client=unknown\[127\.0\.0\.3\], orig_queue_id={postfix_id}, "
                     r"orig_client=\S+\[127\.0\.0\.2\]\n", log), log
    received = message.content.split(b"\r\n", 2)[:2]
    assert re.fullmatch(rb"Received: from origin\.example \(\S+ \[127\.0\.0\.2\]\)", received[0])
    assert received[1].startswith(b"\tby mx.tern.test (Tern) with ESMTP id ")
