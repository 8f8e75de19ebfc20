"""The whole mail path against real peers: smtplib/swaks → tern (a real process) → smtp-sink,
with MX answers from a real unbound server on loopback."""

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys

import pytest

QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)")


def send(server, sender, recipients, body: bytes) -> str:
    """One message over smtplib; returns the queue ID from the 250 reply."""
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for recipient in recipients:
            client.rcpt(recipient)
        code, reply = client.data(body)
    assert code == 250, reply
    return QUEUED.search(reply.decode()).group(1)


def test_message_relayed_to_sink_with_envelope_headers_and_logs(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    queue_id = send(server, "alice@example.org", ["bob@example.net", "carol@example.net"],
                    b"Subject: hello\r\n\r\nfirst line\r\n.leading dot\r\n")
    (message,) = sink.wait_messages(1)
    assert message.sender == "alice@example.org"
    assert sorted(message.recipients) == ["bob@example.net", "carol@example.net"]
    content = message.content.replace(b"\r\n", b"\n")
    assert f"with ESMTP id {queue_id}".encode() in content
    assert b"Received: from client.test (unknown [127.0.0.1])" in content
    assert b"\nMessage-Id: <" in content and b"\nDate: " in content
    assert content.endswith(b"\nfirst line\n.leading dot\n")
    log = server.wait_log(f"{queue_id}: removed")
    for expected in [
        "connect from unknown[127.0.0.1]",
        f"{queue_id}: client=unknown[127.0.0.1]",
        f"{queue_id}: message-id=<",
        f"{queue_id}: from=<alice@example.org>, size=",
        f"{queue_id}: to=<bob@example.net>, relay=127.0.0.1[127.0.0.1]:{sink.port}, delay=",
        "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6",
    ]:
        assert expected in log
    sent = re.search(rf"{queue_id}: to=<carol@example.net>, .*delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, "
                     r"dsn=2\.0\.0, status=sent \(250 .*\)", log)
    assert sent is not None


def test_mx_resolution_through_real_dns(tern, smtp_sink, dns_server):
    sink = smtp_sink()
    backup = smtp_sink(host="127.0.0.2", port=sink.port)  # reachable: a wrong order shows
    dns_host, dns_port = dns_server([
        "mxdomain.test. 60 IN MX 20 backup.mxdomain.test.",
        "mxdomain.test. 60 IN MX 10 primary.mxdomain.test.",
        "primary.mxdomain.test. 60 IN A 127.0.0.1",
        "backup.mxdomain.test. 60 IN A 127.0.0.2",
        "aonly.test. 60 IN A 127.0.0.1",
        "nullmx.test. 60 IN MX 0 .",
    ])
    # Postfix's "host:port" next hop: MX lookup of host, delivery on port.
    server = tern(dns_servers=[f"{dns_host}:{dns_port}"], dns_timeout="3s", transport_maps={
        "mxdomain.test": f"smtp:mxdomain.test:{sink.port}",
        "aonly.test": f"smtp:aonly.test:{sink.port}",
        "nullmx.test": f"smtp:nullmx.test:{sink.port}",
        "nxdomain.test": f"smtp:nxdomain.test:{sink.port}",
    })
    send(server, "a@example.org", ["u@mxdomain.test"], b"Subject: mx\r\n\r\nx\r\n")
    send(server, "a@example.org", ["u@aonly.test"], b"Subject: a-only\r\n\r\nx\r\n")
    null_id = send(server, "a@example.org", ["u@nullmx.test"], b"Subject: null\r\n\r\nx\r\n")
    nx_id = send(server, "a@example.org", ["u@nxdomain.test"], b"Subject: nx\r\n\r\nx\r\n")
    messages = sink.wait_messages(2)
    assert sorted(r for m in messages for r in m.recipients) == ["u@aonly.test", "u@mxdomain.test"]
    assert backup.messages() == []  # preference 10 before 20
    log = server.wait_log("status=sent", count=2)
    assert f"relay=primary.mxdomain.test[127.0.0.1]:{sink.port}" in log
    log = server.wait_log(f"{null_id}: removed")
    assert re.search(rf"{null_id}: to=<u@nullmx.test>, .*dsn=5\.1\.10, status=bounced", log)
    log = server.wait_log(f"{nx_id}: removed")
    assert re.search(rf"{nx_id}: to=<u@nxdomain.test>, .*dsn=5\.\d\.\d+, status=bounced", log)


def test_outside_client_cannot_relay_but_may_send_to_relay_domains(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop, mynetworks=["192.0.2.0/24"],
                  relay_domains=["example.org"])
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("someone@elsewhere.test")
        code, reply = client.rcpt("victim@elsewhere.test")
        assert (code, reply) == (554, b"5.7.1 <victim@elsewhere.test>: Relay access denied")
        assert client.rcpt("user@example.org")[0] == 250
    assert "reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <victim@elsewhere.test>: Relay " \
           "access denied; from=<someone@elsewhere.test> to=<victim@elsewhere.test>" in \
           server.wait_log("Relay access denied")


def test_size_limit_is_552_and_session_goes_on(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop, message_size_limit=2000)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "2000"
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        code, reply = client.data(b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n")
        assert (code, reply) == (552, b"5.3.4 Message size exceeds fixed limit")
        assert client.noop()[0] == 250
    assert sink.messages() == []


def test_pipelined_batch_over_a_real_socket_is_answered_in_order(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    with socket.create_connection(server.address, timeout=10) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        raw.sendall(b"EHLO c.test\r\n")  # a batch may follow EHLO's reply, not EHLO itself
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                    b"RCPT TO:<bad\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        codes = []
        while len(codes) < 5:
            line = reader.readline()
            assert line, "the server closed the connection"
            if line[3:4] == b" ":
                codes.append(line[:3])
        assert codes == [b"250", b"250", b"501", b"250", b"354"]
        raw.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert reader.readline().startswith(b"250 2.0.0 Ok: queued as ")
        assert reader.readline().startswith(b"221 ")
    (message,) = sink.wait_messages(1)
    assert list(message.recipients) == ["b@example.net", "c@example.net"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_with_pipelining(tern, smtp_sink):
    sink = smtp_sink()
    server = tern(relayhost=sink.nexthop)
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--pipeline", "--from",
         "a@example.org", "--to", "b@example.net", "--helo", "swaks.test", "--silent", "2"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = sink.wait_messages(1)
    assert list(message.recipients) == ["b@example.net"]


def test_deferred_then_delivered_after_backoff_and_shown_in_queue_list(tern, smtp_sink):
    sink = smtp_sink(start=False)
    server = tern(relayhost=sink.nexthop, minimal_backoff_time="1s", maximal_backoff_time="2s",
                  queue_run_delay="1s")
    queue_id = send(server, "a@example.org", ["b@example.net"], b"Subject: later\r\n\r\nx\r\n")
    log = server.wait_log(f"{queue_id}: to=<b@example.net>")
    assert re.search(rf"{queue_id}: to=<b@example.net>, relay=none, .*dsn=4\.4\.1, "
                     r"status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                     r"Connection refused\)", log), log
    listing = server.tern("queue", "list", "--config", str(server.config_file)).stdout
    assert queue_id in listing and "a@example.org" in listing
    assert "(connect to 127.0.0.1[127.0.0.1]" in listing and "b@example.net" in listing
    sink.start()
    server.wait_log(f"{queue_id}: removed", timeout=20)
    assert len(sink.wait_messages(1)) == 1
    assert "Mail queue is empty" in server.tern("queue", "list", "--config",
                                                str(server.config_file)).stdout


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_restart_loses_nothing_and_delivers_each_message_once(tern, smtp_sink, how):
    sink = smtp_sink(start=False)
    server = tern(relayhost=sink.nexthop, minimal_backoff_time="1s", maximal_backoff_time="1s",
                  queue_run_delay="1s")
    subjects = {f"message {i}" for i in range(50)}
    with smtplib.SMTP(*server.address, timeout=10) as client:
        for subject in sorted(subjects):
            client.sendmail("a@example.org", ["b@example.net"],
                            f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    server.stop(how)
    server.start()
    sink.start()
    server.wait_log(": removed", count=50, timeout=30)
    received = [m.content for m in sink.wait_messages(50, timeout=10)]
    got = [re.search(rb"Subject: (message \d+)", c).group(1).decode() for c in received]
    assert sorted(got) == sorted(subjects)  # every one, exactly once


def test_bad_config_stops_start_up_naming_file_line_and_key(tmp_path):
    bad = tmp_path / "tern.toml"
    bad.write_text('myhostname = "mx.test"\nmessage_size_limit = "ten"\n')
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{bad}:2: message_size_limit:" in result.stderr


def test_version_names_each_hot_path_implementation():
    from engine import speedups

    def version(**env):
        return subprocess.run([sys.executable, "-m", "engine", "version"], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=30).stdout

    assert "reader: pure" in version(TERN_PURE="1")
    expected = speedups.load("reader", pure=False).__name__.startswith("engine._compiled")
    assert f"reader: {'compiled' if expected else 'pure'}" in version(TERN_PURE="0")


def test_unusable_queue_directory_or_busy_port_is_one_fatal_line(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = tmp_path / "tern.toml"
    config.write_text(f'myhostname = "mx.test"\nqueue_directory = "{blocker}/spool"\n')
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"tern: fatal: queue_directory {blocker}/spool: ")
    assert "Traceback" not in result.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config.write_text(f'myhostname = "mx.test"\nqueue_directory = "{tmp_path}/q"\n'
                          f'[[listen]]\naddress = "127.0.0.1:{port}"\nservice = "smtp"\n')
        result = subprocess.run([sys.executable, "-m", "engine", "serve", "--config",
                                 str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == (f"tern: fatal: cannot listen on 127.0.0.1:{port}: "
                             "Address already in use\n")


def test_connection_to_the_next_hop_is_reused_and_logged(tern, smtp_sink):
    sink = smtp_sink()
    # one process: a worker's connection cache is its own, the second message may go to another
    server = tern(relayhost=sink.nexthop, smtp_connection_cache_time_limit="10s", worker_count=1)
    first = send(server, "a@example.org", ["b@example.net"], b"Subject: 1\r\n\r\nx\r\n")
    server.wait_log(f"{first}: removed")
    second = send(server, "a@example.org", ["b@example.net"], b"Subject: 2\r\n\r\nx\r\n")
    log = server.wait_log(f"{second}: removed")
    assert re.search(rf"{second}: to=<b@example.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                     r"conn_use=2, ", log), log
