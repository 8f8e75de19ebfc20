"""The smtpd adapter on a proxy_protocol listener, over real loopback sockets: the header comes
first and names the client that mynetworks, logs and Received: see; no valid header in time
means a warning, 421 and hang-up, never a greeting. Also XCLIENT / XFORWARD in the adapter."""

import asyncio
import base64
import contextlib
import io
import ipaddress

import pytest
import uvloop
from test_proxy import v1, v2

from engine.cleanup import Cleanup
from engine.config import Config, Listener
from engine.log import Maillog
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.memory import MemorySpool

EXTERNAL_CLIENT = ("192.0.2.7", 40000)
SERVER = ("127.0.0.1", 25)
RELAY_ATTEMPT = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
MESSAGE = b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
RELAY_DENIED = "554 5.7.1 <b@example.net>: Relay access denied"


class Server:
    """One listener of the adapter on 127.0.0.1, with an in-memory spool and a captured log."""

    def __init__(self, *, proxy_protocol=True, **config):
        # these tests write whole dialogues at once; the check itself has its own test below
        config.setdefault("smtpd_forbid_unauth_pipelining", False)
        self.spool = MemorySpool()
        self.log = io.StringIO()
        self.config = Config(myhostname="mx.test", **config)
        self.listener = Listener("127.0.0.1", 0, proxy_protocol=proxy_protocol)

    async def __aenter__(self):
        maillog = Maillog("mx.test", stream=self.log)
        context = SmtpdContext(config=self.config, maillog=maillog, listener=self.listener,
                               cleanup=Cleanup(self.spool, maillog, self.config))
        self.server = await asyncio.get_running_loop().create_server(
            lambda: SmtpdProtocol(context), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def connect(self):
        return await asyncio.open_connection("127.0.0.1", self.port)

    def logged(self) -> str:
        return self.log.getvalue()

    def content(self) -> list[bytes]:
        return [self.spool.content(e.queue_id) for e in self.spool.envelopes()]


async def replies(reader, count):
    """The next ``count`` final reply lines (multi-line replies folded to their last line)."""
    final = []
    while len(final) < count:
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line, f"closed after {final}"
        if line[3:4] == b" ":
            final.append(line.decode().rstrip())
    return final


async def everything(reader) -> bytes:
    """All the server sends until it closes (bounded in time)."""
    return await asyncio.wait_for(reader.read(), 10)


async def close(writer):
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def run(scenario):
    return asyncio.run(scenario())


# -- the header names the client ------------------------------------------------------------------


def test_header_and_smtp_in_one_packet_are_both_used():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            writer.write(v1(EXTERNAL_CLIENT, SERVER) + b"EHLO c.test\r\n" + RELAY_ATTEMPT)
            answers = await replies(reader, 4)
            await close(writer)
            return answers, server.logged()

    answers, log = run(scenario)
    assert answers[0] == "220 mx.test ESMTP Tern"
    assert answers[1].startswith("250 ")  # EHLO's last line
    assert answers[2:] == ["250 2.1.0 Ok", RELAY_DENIED]  # 192.0.2.7 may not relay
    assert "connect from unknown[192.0.2.7]" in log
    assert ": reject: RCPT from unknown[192.0.2.7]: 554 5.7.1" in log
    assert "127.0.0.1" not in log  # the proxy's own address is nobody's business


def test_smtp_sent_behind_the_header_is_pipelining_before_the_greeting():
    """As Postfix: the proxied client spoke before our greeting."""
    async def scenario():
        async with Server(smtpd_forbid_unauth_pipelining=True) as server:
            reader, writer = await server.connect()
            writer.write(v1(EXTERNAL_CLIENT, SERVER) + b"EHLO c.test\r\n")
            sent = await everything(reader)
            await close(writer)
            return sent, server.logged()

    sent, log = run(scenario)
    assert sent == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"  # no greeting
    assert "improper command pipelining after CONNECT from unknown[192.0.2.7]: EHLO c.test" in log


def test_v2_header_client_is_in_received_and_may_relay_from_mynetworks():
    async def scenario():
        async with Server(mynetworks=(ipaddress.ip_network("192.0.2.0/24"),)) as server:
            reader, writer = await server.connect()
            writer.write(v2(EXTERNAL_CLIENT, SERVER))
            greeting = await replies(reader, 1)
            writer.write(b"EHLO c.test\r\n" + RELAY_ATTEMPT + MESSAGE)
            answers = await replies(reader, 5)
            await close(writer)
            return greeting + answers, server.content(), server.logged()

    answers, (content,), log = run(scenario)
    assert answers[3] == "250 2.1.5 Ok"  # relay permitted: 192.0.2.7 is in mynetworks now
    assert answers[5].startswith("250 2.0.0 Ok: queued as")
    assert content.startswith(b"Received: from c.test (unknown [192.0.2.7])\r\n")
    assert "client=unknown[192.0.2.7]" in log


def test_header_sent_byte_by_byte_still_works():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            for byte in v2(EXTERNAL_CLIENT, SERVER, tlvs=b"\x05\x00\x02id"):
                writer.write(bytes([byte]))
                await writer.drain()
            greeting = await replies(reader, 1)
            await close(writer)
            return greeting, server.logged()

    greeting, log = run(scenario)
    assert greeting == ["220 mx.test ESMTP Tern"]
    assert "connect from unknown[192.0.2.7]" in log


def test_connection_limit_applies_after_the_header_to_the_proxied_client():
    async def scenario():
        async with Server(smtpd_connection_limit=1) as server:
            first_reader, first_writer = await server.connect()
            first_writer.write(v1(("192.0.2.1", 1), SERVER))
            await replies(first_reader, 1)
            reader, writer = await server.connect()
            writer.write(v2(EXTERNAL_CLIENT, SERVER))
            sent = await everything(reader)
            await close(writer)
            await close(first_writer)
            return sent, server.logged()

    sent, log = run(scenario)
    assert sent == b"421 4.7.0 mx.test Error: too many connections\r\n"
    assert "warning: connection limit 1 reached: refusing unknown[192.0.2.7]" in log


def test_local_command_is_the_proxy_itself():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            writer.write(v2(command=0x0) + b"QUIT\r\n")
            answers = await replies(reader, 2)
            await close(writer)
            return answers, server.logged()

    answers, log = run(scenario)
    assert answers == ["220 mx.test ESMTP Tern", "221 2.0.0 Bye"]
    assert "connect from unknown[127.0.0.1]" in log


# -- no valid header: refused ---------------------------------------------------------------------


def test_no_header_is_refused_without_a_greeting():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            writer.write(b"EHLO c.test\r\n")
            sent = await everything(reader)
            await close(writer)
            return sent, server.logged()

    sent, log = run(scenario)
    assert sent == b"421 4.3.0 mx.test Server local error\r\n"  # then closed; no 220
    assert "warning: haproxy read: unrecognized protocol header: EHLO c.test\\r\\n" in log
    assert "connect from unknown[127.0.0.1]" in log
    assert "disconnect from unknown[127.0.0.1] commands=0" in log


def test_invalid_header_is_refused():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 25\r\nEHLO c.test\r\n")
            sent = await everything(reader)
            await close(writer)
            return sent, server.logged()

    sent, log = run(scenario)
    assert sent == b"421 4.3.0 mx.test Server local error\r\n"
    assert "warning: haproxy read: bad or missing client port: PROXY TCP4 192.0.2.7" in log
    assert "192.0.2.7]" not in log  # nobody was believed


def test_slow_header_times_out_without_a_greeting():
    async def scenario():
        async with Server(smtpd_upstream_proxy_timeout=0.2) as server:
            reader, writer = await server.connect()
            writer.write(b"PROXY TCP4 192.0.2.7")  # and nothing more
            started = asyncio.get_running_loop().time()
            sent = await everything(reader)
            waited = asyncio.get_running_loop().time() - started
            await close(writer)
            return sent, waited, server.logged()

    sent, waited, log = run(scenario)
    assert sent == b"421 4.3.0 mx.test Server local error\r\n"
    assert waited >= 0.1
    assert "warning: haproxy read: timeout error" in log


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop],
                         ids=["uvloop", "asyncio"])
def test_a_bad_header_is_refused_once_not_again_at_the_header_timeout(loop_factory):
    errors = []

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda _, error: errors.append(error))
        async with Server(smtpd_upstream_proxy_timeout=0.2) as server:
            reader, writer = await server.connect()
            writer.write(b"EHLO c.test\r\n")
            sent = await everything(reader)
            await close(writer)
            await asyncio.sleep(0.5)  # well past the header timeout
            return sent, server.logged()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        sent, log = runner.run(scenario())
    assert sent == b"421 4.3.0 mx.test Server local error\r\n"
    assert log.count("warning: haproxy read:") == 1 and "timeout error" not in log
    assert log.count(": connect from unknown[127.0.0.1]") == 1
    assert log.count(": disconnect from unknown[127.0.0.1]") == 1
    assert errors == []  # uvloop: the timer wrote to the closed transport (RuntimeError)


def test_header_timer_stops_once_the_header_is_read():
    async def scenario():
        async with Server(smtpd_upstream_proxy_timeout=0.2) as server:
            reader, writer = await server.connect()
            writer.write(v1(EXTERNAL_CLIENT, SERVER))
            greeting = await replies(reader, 1)
            await asyncio.sleep(0.5)  # well past the header timeout
            writer.write(b"NOOP\r\n")
            answer = await replies(reader, 1)
            await close(writer)
            return greeting + answer, server.logged()

    answers, log = run(scenario)
    assert answers == ["220 mx.test ESMTP Tern", "250 2.0.0 Ok"]
    assert "warning" not in log


def test_endless_header_line_is_refused_at_the_v1_limit_not_buffered():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            writer.write(b"PROXY TCP4 " + b"1" * 200)  # past 107 bytes, no line end
            sent = await everything(reader)
            await close(writer)
            return sent, server.logged()

    sent, log = run(scenario)
    assert sent == b"421 4.3.0 mx.test Server local error\r\n"
    assert "warning: haproxy read: missing protocol header terminator: PROXY TCP4 111" in log


def test_client_closing_mid_header_is_logged_and_no_session_starts():
    async def scenario():
        async with Server() as server:
            reader, writer = await server.connect()
            writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1")
            writer.write_eof()
            sent = await everything(reader)
            await close(writer)
            return sent, server.logged()

    sent, log = run(scenario)
    assert not sent.startswith(b"220")
    assert "warning: haproxy read: missing protocol header terminator" in log
    assert "lost connection" not in log


def test_plain_listener_greets_at_once_and_a_header_there_is_just_a_bad_command():
    async def scenario():
        async with Server(proxy_protocol=False) as server:
            reader, writer = await server.connect()
            greeting = await replies(reader, 1)
            writer.write(v1(EXTERNAL_CLIENT, SERVER))
            answer = await replies(reader, 1)
            await close(writer)
            return greeting + answer, server.logged()

    answers, log = run(scenario)
    assert answers == ["220 mx.test ESMTP Tern", "502 5.5.2 Error: command not recognized"]
    assert "connect from unknown[127.0.0.1]" in log


# -- XCLIENT and XFORWARD in the adapter ------------------------------------------------------

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


def test_xclient_changes_relay_trust_and_logs_but_not_its_own_authorization():
    """As Postfix: XCLIENT/XFORWARD authorization is the connection's (the proxy's), decided
    once; the proxy may send XCLIENT again after naming an unauthorized client."""
    async def scenario():
        async with Server(proxy_protocol=False, smtpd_authorized_xclient_hosts=LOOPBACK) as server:
            reader, writer = await server.connect()
            await replies(reader, 1)
            writer.write(b"EHLO proxy.test\r\n" + RELAY_ATTEMPT + b"RSET\r\n")
            before = await replies(reader, 4)  # trusted as 127.0.0.1: relay permitted (cached)
            writer.write(b"XCLIENT NAME=mail.example.org ADDR=192.0.2.7\r\n")
            greeting = await replies(reader, 1)
            writer.write(b"EHLO mail.example.org\r\n" + RELAY_ATTEMPT + b"RSET\r\n"
                         b"XCLIENT ADDR=127.0.0.1\r\nQUIT\r\n")
            after = await replies(reader, 6)
            await close(writer)
            return before, greeting, after, server.logged()

    before, greeting, after, log = run(scenario)
    assert before[2] == "250 2.1.5 Ok"
    assert greeting == ["220 mx.test ESMTP Tern"]
    assert after[2] == RELAY_DENIED  # 192.0.2.7 is not in mynetworks
    assert after[4] == "220 mx.test ESMTP Tern"  # the proxy is still the proxy
    assert "reject: RCPT from mail.example.org[192.0.2.7]: 554 5.7.1" in log
    assert "disconnect from mail.example.org[127.0.0.1]" in log  # as the XCLIENTs left it


def test_xclient_cannot_name_itself_into_the_xforward_hosts():
    """Only 127.0.0.1 may send XCLIENT, only 192.0.2.7 XFORWARD: a client that XCLIENT names
    192.0.2.7 does not gain XFORWARD (authorization is the connection's, not XCLIENT's)."""
    async def scenario():
        async with Server(proxy_protocol=False, smtpd_authorized_xclient_hosts=LOOPBACK,
                          smtpd_authorized_xforward_hosts=(ipaddress.ip_network("192.0.2.7"),)
                          ) as server:
            reader, writer = await server.connect()
            await replies(reader, 1)
            writer.write(b"XCLIENT ADDR=192.0.2.7\r\nEHLO c.test\r\n"
                         b"XFORWARD NAME=forged.example\r\nQUIT\r\n")
            answers = []
            for _ in range(20):  # every line, the EHLO's too
                line = (await asyncio.wait_for(reader.readline(), 5)).decode().rstrip()
                answers.append(line)
                if line.startswith("221"):
                    break
            await close(writer)
            return answers

    answers = run(scenario)
    assert answers[0] == "220 mx.test ESMTP Tern"
    assert not any("XFORWARD" in line for line in answers)  # not advertised
    assert "550 5.7.0 Error: insufficient authorization" in answers


def test_xclient_login_makes_the_message_authenticated():
    async def scenario():
        async with Server(proxy_protocol=False, smtpd_authorized_xclient_hosts=LOOPBACK) as server:
            reader, writer = await server.connect()
            await replies(reader, 1)
            writer.write(b"XCLIENT ADDR=127.0.0.5 LOGIN=alice HELO=client.example PROTO=ESMTP\r\n"
                         + RELAY_ATTEMPT + MESSAGE)
            answers = await replies(reader, 5)
            await close(writer)
            return answers, server.content(), server.logged()

    answers, (content,), log = run(scenario)
    assert answers[-1].startswith("250 2.0.0 Ok: queued as")
    assert content.startswith(b"Received: from client.example (unknown [127.0.0.5])\r\n"
                              b"\tby mx.test (Tern) with ESMTPA id ")
    assert ": client=unknown[127.0.0.5], sasl_method=XCLIENT, sasl_username=alice\n" in log


def test_xclient_without_login_logs_the_proxy_s_own_auth_out(tmp_path):
    """The proxy authenticated as itself; the client it then names by XCLIENT (no LOGIN) is
    not: it may not relay, and nothing records it as alice."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}secret\n")

    async def scenario():
        async with Server(proxy_protocol=False, smtpd_authorized_xclient_hosts=LOOPBACK,
                          mynetworks=(), smtpd_tls_auth_only=False, smtpd_sasl_auth_enable=True,
                          smtpd_sasl_password_file=str(passwd)) as server:
            reader, writer = await server.connect()
            await replies(reader, 1)
            writer.write(b"EHLO proxy.test\r\nAUTH PLAIN "
                         + base64.b64encode(b"\0alice\0secret") + b"\r\n")
            authenticated = (await replies(reader, 2))[1]
            writer.write(b"XCLIENT ADDR=192.0.2.66 NAME=evil.example\r\nEHLO evil.example\r\n"
                         + RELAY_ATTEMPT)
            answers = await replies(reader, 4)
            await close(writer)
            return authenticated, answers, server.logged()

    authenticated, answers, log = run(scenario)
    assert authenticated.startswith("235 ")
    assert answers[2] == "250 2.1.0 Ok" and answers[3] == RELAY_DENIED
    assert ": client=evil.example[192.0.2.66]\n" in log  # no sasl_username=alice
    assert "reject: RCPT from evil.example[192.0.2.66]: 554 5.7.1" in log


def test_xforward_names_the_upstream_client_for_one_message():
    async def scenario():
        async with Server(proxy_protocol=False, smtpd_authorized_xforward_hosts=LOOPBACK) as server:
            reader, writer = await server.connect()
            await replies(reader, 1)
            writer.write(b"EHLO filter.test\r\nXFORWARD NAME=up.example ADDR=192.0.2.9 "
                         b"PROTO=ESMTP\r\nXFORWARD HELO=up-helo.example IDENT=4Bx9Yz\r\n"
                         + RELAY_ATTEMPT + MESSAGE + RELAY_ATTEMPT + MESSAGE)
            answers = await replies(reader, 11)
            await close(writer)
            return answers, server.content(), server.logged()

    answers, (first, second), log = run(scenario)
    assert answers[1:3] == ["250 2.0.0 Ok", "250 2.0.0 Ok"]
    assert answers[4] == "250 2.1.5 Ok"  # relay decided by the real client, 127.0.0.1
    assert first.startswith(b"Received: from up-helo.example (up.example [192.0.2.9])\r\n"
                            b"\tby mx.test (Tern) with ESMTP id ")
    assert second.startswith(b"Received: from filter.test (unknown [127.0.0.1])\r\n")
    assert ": client=unknown[127.0.0.1], orig_queue_id=4Bx9Yz, " \
           "orig_client=up.example[192.0.2.9]\n" in log
    assert log.count("orig_client=") == 1  # the second message is the filter's own


def test_client_restrictions_judge_the_proxied_then_the_xclient_identity():
    async def scenario():
        async with Server(smtpd_client_restrictions=("permit_mynetworks", "reject"),
                          smtpd_authorized_xclient_hosts=(ipaddress.ip_network("127.0.0.9"),),
                          smtpd_delay_reject=False) as server:
            reader, writer = await server.connect()
            writer.write(v1(("127.0.0.9", 1), SERVER) + b"EHLO c.test\r\n"
                         b"MAIL FROM:<a@example.org>\r\nRSET\r\n"
                         b"XCLIENT ADDR=192.0.2.7\r\nEHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
            answers = await replies(reader, 7)
            await close(writer)
            return answers, server.logged()

    answers, log = run(scenario)
    assert answers[2] == "250 2.1.0 Ok"  # 127.0.0.9 is in mynetworks
    assert answers[4] == "220 mx.test ESMTP Tern"
    assert answers[6].startswith("554 5.7.1 <unknown[192.0.2.7]>: Client host rejected")


def test_anvil_counts_the_proxied_client_not_the_proxy():
    """All three connections come from 127.0.0.1 (in mynetworks, so exempt by default);
    the limit applies to each proxied client."""
    async def scenario():
        async with Server(smtpd_client_connection_count_limit=1) as server:
            first_reader, first_writer = await server.connect()
            first_writer.write(v1(EXTERNAL_CLIENT, SERVER))
            first = await replies(first_reader, 1)
            other_reader, other_writer = await server.connect()
            other_writer.write(v1(("192.0.2.8", 2), SERVER))
            other = await replies(other_reader, 1)
            reader, writer = await server.connect()
            writer.write(v2(EXTERNAL_CLIENT, SERVER))
            refused = await everything(reader)
            for stream in (writer, first_writer, other_writer):
                await close(stream)
            return first + other, refused, server.logged()

    greetings, refused, log = run(scenario)
    assert greetings == ["220 mx.test ESMTP Tern"] * 2
    assert refused == b"421 4.7.0 mx.test Error: too many connections from 192.0.2.7\r\n"
    assert "warning: Connection concurrency limit exceeded: 2 from unknown[192.0.2.7]" in log


# -- hosts that may send XCLIENT are not counted by anvil (as Postfix) ----------------------------

XCLIENT_UNCOUNTED = {"proxy_protocol": False, "smtpd_authorized_xclient_hosts": LOOPBACK,
                     "mynetworks": (), "smtpd_client_event_limit_exceptions": ()}


def test_clients_behind_an_xclient_proxy_do_not_share_its_message_rate():
    """Two clients, one message each, behind one XCLIENT proxy: neither is over a message rate
    limit of 1 (anvil counted them both against the proxy's address, and refused the second)."""
    async def scenario():
        async with Server(smtpd_client_message_rate_limit=1, **XCLIENT_UNCOUNTED) as server:
            answers = []
            for address in (b"192.0.2.7", b"192.0.2.8"):
                reader, writer = await server.connect()
                await replies(reader, 1)
                writer.write(b"XCLIENT ADDR=" + address + b"\r\nEHLO c.test\r\n"
                             b"MAIL FROM:<a@example.org>\r\nQUIT\r\n")
                answers += await replies(reader, 4)
                await close(writer)
            return answers, server.logged()

    answers, log = run(scenario)
    assert answers.count("250 2.1.0 Ok") == 2, answers
    assert "rate limit exceeded" not in log


def test_auth_failures_behind_an_xclient_proxy_are_not_the_proxy_s(tmp_path):
    """One failed AUTH from each of three clients behind the proxy: none is refused with
    421 at smtpd_client_auth_failure_limit = 2 (they were all counted against the proxy)."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}secret\n")

    async def scenario():
        async with Server(smtpd_client_auth_failure_limit=2, smtpd_tls_auth_only=False,
                          smtpd_sasl_auth_enable=True, smtpd_sasl_password_file=str(passwd),
                          **XCLIENT_UNCOUNTED) as server:
            answers = []
            wrong = base64.b64encode(b"\0alice\0wrong")
            for address in (b"192.0.2.1", b"192.0.2.2", b"192.0.2.3"):
                reader, writer = await server.connect()
                await replies(reader, 1)
                writer.write(b"XCLIENT ADDR=" + address + b"\r\n")
                await replies(reader, 1)
                writer.write(b"EHLO webmail\r\nAUTH PLAIN " + wrong + b"\r\n")
                answers += (await replies(reader, 2))[1:]
                await close(writer)
            return answers, server.logged()

    answers, log = run(scenario)
    assert answers == ["535 5.7.8 Error: authentication failed: authentication failure"] * 3
    assert "Authentication failure limit exceeded" not in log
