"""engine.tls: the protocol list, the server context (versions, ciphers, SNI) and the handoff of
a live connection to the loop's TLS, run in-process on uvloop and on the stdlib loop."""

import asyncio
import io
import ssl

import pytest
import uvloop
from tls_certs import DEFAULT_NAME, make_certs

from engine.cleanup import Cleanup
from engine.config import Config, Listener
from engine.log import Maillog
from engine.smtp import replies
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.memory import MemorySpool
from engine.tls.protocols import parse_protocols
from engine.tls.server import server_context, sni_lookup_keys


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_config(certs, **settings) -> Config:
    return Config(myhostname="mx.tern.test", smtpd_tls_cert_file=str(certs.default_cert),
                  smtpd_tls_key_file=str(certs.default_key), **settings)


# -- smtpd_tls_protocols -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (">=TLSv1.2", ("TLSv1.2", "TLSv1.3")),
    ("", ("TLSv1", "TLSv1.3")),
    (">=TLSv1, <=TLSv1.2", ("TLSv1", "TLSv1.2")),
    ("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1", ("TLSv1.2", "TLSv1.3")),
    ("!SSLv2:!SSLv3", ("TLSv1", "TLSv1.3")),
    ("TLSv1.3", ("TLSv1.3", "TLSv1.3")),
    (">=SSLv3", ("TLSv1", "TLSv1.3")),  # OpenSSL 3 speaks nothing older than TLS 1.0
])
def test_protocols_give_lowest_and_highest(text, expected):
    assert parse_protocols(text) == expected


@pytest.mark.parametrize("text, message", [
    (">=TLSv1.4", "unknown protocol"),
    ("TLSv2", "unknown protocol"),
    (">=TLSv1.3 <=TLSv1.2", "no TLS protocol version is left"),
    ("!TLSv1.2", "gap"),
])
def test_bad_protocol_lists(text, message):
    with pytest.raises(ValueError, match=message):
        parse_protocols(text)


# -- the context ----------------------------------------------------------------------------------


def test_context_is_tls12_plus_with_ecdhe_aead_ciphers(certs):
    context = server_context(tls_config(certs))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe" and cipher["aead"], cipher["name"]


def test_no_certificate_means_no_context():
    assert server_context(Config(myhostname="mx.tern.test")) is None


def test_sni_lookup_keys_are_postfix_s():
    assert sni_lookup_keys("Mail.Example.ORG.") == [
        "mail.example.org", ".example.org", ".org"]


def memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str | None):
    """A handshake between two SSLObjects joined in memory; the client's view of the peer."""
    links = [ssl.MemoryBIO() for _ in range(4)]
    server_side = server.wrap_bio(links[0], links[1], server_side=True)
    client_side = client.wrap_bio(links[2], links[3], server_hostname=name)
    for _ in range(10):
        done = 0
        for side in (client_side, server_side):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        links[0].write(links[3].read())
        links[2].write(links[1].read())
        if done == 2:
            return dict(item[0] for item in client_side.getpeercert()["subject"])["commonName"]
    raise AssertionError("no handshake")


@pytest.mark.parametrize("name, common_name", [
    ("mail.example.org", "mail.example.org"),
    ("MAIL.example.org", "mail.example.org"),
    ("example.net", "example.net"),
    ("deep.sub.example.net", "example.net"),  # through ".example.net"
    ("example.org", DEFAULT_NAME),  # only mail.example.org is listed
    (None, DEFAULT_NAME),  # no SNI at all
])
def test_sni_chooses_the_certificate(certs, name, common_name):
    config = tls_config(certs, tls_server_sni_maps={
        "mail.example.org": str(certs.sni["mail.example.org"]),
        ".example.net": str(certs.sni["example.net"]),
        "example.net": str(certs.sni["example.net"])})
    client = ssl.create_default_context(cafile=str(certs.ca))
    client.check_hostname = False
    assert memory_handshake(server_context(config), client, name) == common_name


# -- the handoff to the loop's TLS, in-process --------------------------------------------------


SESSIONS: set = set()  # the sessions of the server under test, cut at the end of a scenario
OPENED: list = []  # client transports, likewise
SCENARIO_TIMEOUT = 10  # seconds: a lost byte shows as a stall, which must end as a failure
LOOPS = [pytest.param(uvloop.new_event_loop, id="uvloop"),
         pytest.param(asyncio.new_event_loop, id="asyncio")]


async def start(certs, service: str, contexts: list | None = None, **settings):
    """A listener of ``service`` on loopback with one client connected (``contexts`` gets the
    listener's SmtpdContext, for a test that looks at its sessions and anvil counts)."""
    log = io.StringIO()
    # a test sends EHLO and NOOP in the packet that ends the handshake: improper pipelining
    config = tls_config(certs, smtpd_forbid_unauth_pipelining=False, **settings)
    maillog = Maillog("mx.tern.test", stream=log)
    context = SmtpdContext(config=config, cleanup=Cleanup(MemorySpool(), maillog, config),
                           maillog=maillog, listener=Listener(service=service), sessions=SESSIONS,
                           tls=server_context(config))
    if contexts is not None:
        contexts.append(context)
    server = await asyncio.get_running_loop().create_server(
        lambda: SmtpdProtocol(context), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    OPENED.append(writer.transport)
    server.close()  # no more connections; the one made goes on
    return server, reader, writer, log


def run(loop_factory, scenario):
    """Run ``scenario()`` on a fresh loop, bounded in time; a stalled session is cut, not
    waited for, so a lost byte fails the test instead of hanging it."""

    async def bounded():
        try:
            return await asyncio.wait_for(scenario(), SCENARIO_TIMEOUT)
        finally:
            for session in list(SESSIONS):
                session.transport.abort()
            for transport in OPENED:
                transport.abort()
            await asyncio.sleep(0.05)  # let the loop deliver connection_lost

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())


class MemoryTlsClient:
    """A TLS client over asyncio streams that controls which bytes go out together."""

    def __init__(self, certs, reader, writer):
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.check_hostname = False
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=DEFAULT_NAME)
        self.reader, self.writer = reader, writer

    async def handshake(self, then: bytes) -> None:
        """Handshake, then send ``then`` in the same write as the client's Finished."""
        for _ in range(20):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.writer.write(self.outgoing.read())
                await self._receive()
        self.tls.write(then)
        self.writer.write(self.outgoing.read())

    async def _receive(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionError("server closed")
        self.incoming.write(data)

    async def lines(self, final: int) -> list[bytes]:
        """Reply lines until ``final`` last lines (``NNN text``) were read."""
        text = b""
        for _ in range(50):
            try:
                text += self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self._receive()
                continue
            lines = text.split(b"\r\n")
            if sum(1 for line in lines if line[3:4] == b" ") >= final:
                return [line for line in lines if line]
        raise AssertionError(f"no reply: {text!r}")


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_command_in_the_same_packet_as_the_finished_message_is_answered_over_tls(
        certs, loop_factory):
    """The TLS layer hands over the client's first command before the coroutine that awaited
    start_tls has resumed: the reply must still go out encrypted, and nothing be lost."""

    async def scenario():
        server, reader, writer, log = await start(certs, "smtp")
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"STARTTLS\r\n")
        assert await reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        client = MemoryTlsClient(certs, reader, writer)
        await client.handshake(then=b"EHLO client.test\r\nNOOP\r\n")
        lines = await client.lines(2)
        writer.close()
        server.close()
        return lines, log.getvalue()

    lines, log = run(loop_factory, scenario)
    assert lines[0] == b"250-mx.tern.test" and lines[-1] == b"250 2.0.0 Ok"
    assert b"250-STARTTLS" not in lines
    assert "Anonymous TLS connection established from unknown[127.0.0.1]: TLSv1.3" in log


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_smtps_client_hello_sent_at_once_reaches_the_tls_layer(certs, loop_factory):
    """uvloop starts reading right after connection_made: a ClientHello sent with the
    connection must still go to the TLS layer, and the greeting come after the handshake."""

    async def scenario():
        server, reader, writer, log = await start(certs, "smtps")
        client = MemoryTlsClient(certs, reader, writer)
        await client.handshake(then=b"EHLO client.test\r\n")
        lines = await client.lines(2)
        writer.close()
        server.close()
        return lines, log.getvalue()

    lines, log = run(loop_factory, scenario)
    assert lines[0] == b"220 mx.tern.test ESMTP Tern"
    assert lines[1] == b"250-mx.tern.test" and b"250-STARTTLS" not in lines
    assert "SSL_accept error" not in log and "unknown=" not in log


@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize("service", ["smtps", "smtp"])
@pytest.mark.parametrize("cut_by", ["timeout", "shutdown"])
def test_a_handshake_cut_by_us_gives_back_its_slot_and_anvil_count(certs, loop_factory, service,
                                                                   cut_by):
    """A client that never sends its ClientHello: smtpd_timeout or a shutdown cuts the
    handshake. Its session slot (smtpd_connection_limit) and anvil count must be given back
    and the disconnect logged, or stalled handshakes would lock every client out."""
    contexts, errors = [], []

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda _, error: errors.append(error))
        server, reader, writer, log = await start(
            certs, service, contexts, smtpd_timeout=1 if cut_by == "timeout" else 30,
            smtpd_client_event_limit_exceptions=())  # 127.0.0.1 is counted by anvil
        context, = contexts
        if service == "smtp":
            assert (await reader.readline()).startswith(b"220 ")
            writer.write(b"STARTTLS\r\n")
            assert await reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        for _ in range(100):  # the session is in its handshake (smtps: at once)
            if context.sessions:
                break
            await asyncio.sleep(0.01)
        during = len(context.sessions), context.anvil.sessions("127.0.0.1")
        if cut_by == "shutdown":  # as engine.serve at the end
            for session in list(context.sessions):
                session.close_with(replies.SHUTTING_DOWN)
        hung_up = await reader.read()  # the server aborts the connection: no plaintext 421
        await asyncio.sleep(0.05)  # let the loop deliver what the abort causes
        after = len(context.sessions), context.anvil.sessions("127.0.0.1")
        writer.close()
        server.close()
        return during, hung_up, after, log.getvalue()

    during, hung_up, after, log = run(loop_factory, scenario)
    assert during == (1, 1)
    assert hung_up == b""
    assert after == (0, 0)
    assert log.count("disconnect from unknown[127.0.0.1]") == 1
    assert ("timeout after" in log) == (cut_by == "timeout")
    assert "SSL_accept error" not in log
    assert errors == []  # no task failed unheard (it did: start_tls gave None, or no SSL object)
