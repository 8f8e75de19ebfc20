"""Restrictions through a running ``tern serve``, with smtplib and raw pipelined bytes:
replies on the wire, Postfix's reject log lines, and DNS restrictions answered later by the
adapter against a real unbound (the client on loopback is made untrusted by mynetworks). The
last test runs the adapter in-process with a resolver held by the test, to see the session
while a DNS check is pending."""

import asyncio
import io
import smtplib
import socket

import pytest

from engine.cleanup import Cleanup
from engine.config import Config
from engine.delivery import PermanentFailure
from engine.log import Maillog
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.memory import MemorySpool

UNTRUSTED = {"mynetworks": ["192.0.2.0/24"], "relay_domains": ["relay.test"]}


def rcpt(client: smtplib.SMTP, address: str) -> tuple[int, str]:
    code, text = client.docmd(f"RCPT TO:<{address}>")
    return code, text.decode()


def test_relay_denied_on_the_wire_and_logged_as_postfix_does(tern):
    server = tern(**UNTRUSTED)
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        client.mail("a@example.net")
        assert rcpt(client, "x@elsewhere.test") == (
            554, "5.7.1 <x@elsewhere.test>: Relay access denied")
        assert rcpt(client, "x@relay.test") == (250, "2.1.5 Ok")
        for routed in ("user%elsewhere.test@relay.test", '"user@elsewhere.test"@relay.test',
                       "elsewhere.test!user@relay.test", "user%elsewhere.test@mx.tern.test"):
            assert rcpt(client, routed) == (554, f"5.7.1 <{routed}>: Relay access denied")
        # a source route is dropped by the grammar (RFC 5321 §3.6.1): the address left is
        # the one checked and used, so the route cannot lead anywhere
        assert rcpt(client, "@relay.test:x@elsewhere.test") == (
            554, "5.7.1 <x@elsewhere.test>: Relay access denied")
        assert rcpt(client, "x@mx.tern.test") == (
            550, "5.1.1 <x@mx.tern.test>: Recipient address rejected: "
                 "User unknown in local recipient table")
    log = server.wait_log("disconnect from")
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <x@elsewhere.test>: "
            "Relay access denied; from=<a@example.net> to=<x@elsewhere.test> proto=ESMTP "
            "helo=<client.test>") in log
    # once a recipient is accepted the transaction has its queue file (Postfix's queue ID)
    queue_id = log.split(": client=")[0].rsplit(" ", 1)[1]
    assert (f"{queue_id}: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 "
            "<user%elsewhere.test@relay.test>: Relay access denied") in log


def test_a_source_route_is_dropped_never_followed(tern, smtp_sink):
    """RFC 5321 §3.6.1: the route is ignored and mail goes to the final address. So
    ``@elsewhere.test:x@relay.test`` is delivered to x@relay.test (ours), never via elsewhere."""
    sink = smtp_sink()
    server = tern(**UNTRUSTED, relayhost=sink.nexthop)
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        client.mail("a@example.net")
        assert rcpt(client, "@elsewhere.test,@other.test:x@relay.test") == (250, "2.1.5 Ok")
        code, _ = client.data(b"Subject: routed\r\n\r\nbody\r\n")
        assert code == 250
    server.wait_log("status=sent")
    (message,) = sink.messages()
    assert message.recipients == ("x@relay.test",)


def test_trusted_client_may_relay(tern):
    server = tern(relay_domains=["relay.test"])
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        client.mail("a@example.net")
        assert rcpt(client, "x@elsewhere.test")[0] == 250
        assert rcpt(client, "user%elsewhere.test@relay.test")[0] == 250


def test_helo_client_and_data_restrictions(tern, tmp_path):
    cidr = tmp_path / "clients.cidr"
    cidr.write_text("127.0.0.2/32  REJECT not this one\n127.0.0.0/8  DUNNO\n")
    server = tern(**UNTRUSTED, smtpd_delay_reject=False,
                  smtpd_client_restrictions=f"check_client_access cidr:{cidr}",
                  smtpd_helo_restrictions="reject_non_fqdn_helo_hostname",
                  smtpd_data_restrictions=[
                      "check_sender_access inline:{ { a@bad.test = 550 5.7.0 no data } }"])
    with smtplib.SMTP(*server.address) as client:
        assert client.ehlo("localhost") == (
            504, b"5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname")
        assert client.ehlo("client.test")[0] == 250
        client.mail("a@bad.test")
        assert rcpt(client, "x@relay.test")[0] == 250
        code, text = client.docmd("DATA")
        assert (code, text) == (550, b"5.7.0 <a@bad.test>: Sender address rejected: no data")
    with smtplib.SMTP(*server.address, source_address=("127.0.0.2", 0)) as client:
        assert client.ehlo("client.test") == (
            554, b"5.7.1 <unknown[127.0.0.2]>: Client host rejected: not this one")
    log = server.wait_log("reject: EHLO from unknown[127.0.0.2]")
    assert ("NOQUEUE: reject: EHLO from unknown[127.0.0.1]: 504 5.5.2 <localhost>: Helo "
            "command rejected: need fully-qualified hostname; from=<> proto=ESMTP "
            "helo=<localhost>") in log
    assert "reject: DATA from unknown[127.0.0.1]: 550 5.7.0 <a@bad.test>: Sender address " \
           "rejected: no data; from=<a@bad.test> to=<x@relay.test>" in log


def test_dns_restrictions_answer_later_and_keep_pipelined_order(tern, dns_server):
    host, port = dns_server(["known.test. 60 IN MX 10 mail.known.test.",
                             "mail.known.test. 60 IN A 127.0.0.1"])
    server = tern(**UNTRUSTED, dns_servers=[f"{host}:{port}"], dns_timeout="3s",
                  smtpd_forbid_unauth_pipelining=False,  # the batch goes on after NOOP
                  smtpd_sender_restrictions="reject_unknown_sender_domain",
                  smtpd_recipient_restrictions=["reject_unauth_destination",
                                                "reject_unknown_recipient_domain"])
    with socket.create_connection(server.address, timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        sock.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        # one pipelined batch: the unknown sender domain is refused at each RCPT (delay_reject)
        sock.sendall(b"MAIL FROM:<a@nowhere.test>\r\nRCPT TO:<x@relay.test>\r\n"
                     b"RCPT TO:<y@relay.test>\r\nRSET\r\n"
                     b"MAIL FROM:<a@known.test>\r\nRCPT TO:<x@relay.test>\r\n"
                     b"NOOP\r\nQUIT\r\n")
        replies = [reader.readline().decode().rstrip() for _ in range(8)]
    assert replies == [
        "250 2.1.0 Ok",
        "450 4.1.8 <a@nowhere.test>: Sender address rejected: Domain not found",
        "450 4.1.8 <a@nowhere.test>: Sender address rejected: Domain not found",
        "250 2.0.0 Ok",
        "250 2.1.0 Ok",
        # relay.test is not in the zone: the recipient domain check answers too
        "450 4.1.2 <x@relay.test>: Recipient address rejected: Domain not found",
        "250 2.0.0 Ok",
        "221 2.0.0 Bye",
    ]


def test_dns_restriction_passes_a_known_domain_and_mail_is_queued(tern, dns_server):
    host, port = dns_server(["known.test. 60 IN A 127.0.0.1"])
    server = tern(**UNTRUSTED, dns_servers=[f"{host}:{port}"], dns_timeout="3s",
                  smtpd_sender_restrictions="reject_unknown_sender_domain")
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        client.mail("a@known.test")
        assert rcpt(client, "x@relay.test")[0] == 250
        code, text = client.data(b"Subject: hi\r\n\r\nbody\r\n")
        assert code == 250 and b"queued as" in text


@pytest.mark.parametrize("setting, problem", [
    ('smtpd_relay_restrictions = "permit"', "specify at least one of reject_unauth_destination"),
    ('smtpd_client_restrictions = "check_client_access texthash:/nonexistent/x"',
     "cannot read"),
])
def test_bad_restrictions_stop_start_up(tern, setting, problem):
    server = tern(start=False)
    server.config_file.write_text(setting + "\n" + server.config_file.read_text())
    result = server.tern("serve", "--config", str(server.config_file))
    assert result.returncode != 0
    assert problem in result.stderr and "tern.toml:1:" in result.stderr


class GatedResolver:
    """Answers NXDOMAIN when the test opens the gate: a DNS restriction held pending."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.asked = []

    async def mx_hosts(self, domain):
        self.asked.append(domain)
        await self.gate.wait()
        raise PermanentFailure("5.1.2", f"name={domain} type=MX: Host not found")


def test_pending_dns_check_pauses_reading_and_survives_a_lost_connection():
    """While a DNS restriction is pending the adapter reads no more input (bounded memory);
    a client that leaves meanwhile ends the session cleanly once the answer comes."""
    sessions: set = set()
    errors = []

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        log = io.StringIO()
        config = Config(myhostname="mx.test", mynetworks=(), relay_domains=("relay.test",),
                        smtpd_sender_restrictions=("reject_unknown_sender_domain",),
                        smtpd_forbid_unauth_pipelining=False)  # the batch follows EHLO
        maillog = Maillog("mx.test", stream=log)
        resolver = GatedResolver()
        context = SmtpdContext(config=config, cleanup=Cleanup(MemorySpool(), maillog, config),
                               maillog=maillog, sessions=sessions, resolver=resolver)
        server = await asyncio.get_running_loop().create_server(
            lambda: SmtpdProtocol(context), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        await reader.readline()
        writer.write(b"EHLO c.test\r\nMAIL FROM:<a@nowhere.test>\r\nRCPT TO:<b@relay.test>\r\n")
        for _ in range(200):  # bounded: until the RCPT is waiting for DNS
            if resolver.asked:
                break
            await asyncio.sleep(0.01)
        (session,) = sessions
        reading = session.transport.is_reading()
        writer.close()
        await asyncio.sleep(0.05)
        resolver.gate.set()
        for _ in range(200):
            if "disconnect from" in log.getvalue():
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return resolver.asked, reading, log.getvalue()

    asked, reading, log = asyncio.run(scenario())
    assert asked == ["nowhere.test"]
    assert reading is False
    assert "reject: RCPT from unknown[127.0.0.1]: 450 4.1.8 <a@nowhere.test>: Sender address " \
           "rejected: Domain not found" in log
    assert "lost connection after RCPT from unknown[127.0.0.1]" in log
    assert "disconnect from unknown[127.0.0.1]" in log
    assert errors == []
