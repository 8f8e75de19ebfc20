"""PROXY protocol in front of an smtps listener: the header first, then the TLS handshake, then
the greeting. A ClientHello arriving in the same packet as the header must reach the TLS layer,
on uvloop and on asyncio (the helpers are test_tls_server's)."""

import asyncio
import io
import ssl

import pytest
from test_proxy import v2
from test_tls_server import LOOPS, OPENED, SESSIONS, MemoryTlsClient, certs, run, tls_config  # noqa: F401

from engine.cleanup import Cleanup
from engine.config import Listener
from engine.log import Maillog
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.memory import MemorySpool
from engine.tls.server import server_context


async def start_proxied_smtps(certs):  # noqa: F811
    log = io.StringIO()
    config = tls_config(certs)
    maillog = Maillog("mx.tern.test", stream=log)
    context = SmtpdContext(config=config, cleanup=Cleanup(MemorySpool(), maillog, config),
                           maillog=maillog, sessions=SESSIONS, tls=server_context(config),
                           listener=Listener(service="smtps", proxy_protocol=True))
    server = await asyncio.get_running_loop().create_server(
        lambda: SmtpdProtocol(context), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    OPENED.append(writer.transport)
    server.close()
    return server, reader, writer, log


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_header_and_client_hello_in_one_packet(certs, loop_factory):  # noqa: F811
    async def scenario():
        server, reader, writer, log = await start_proxied_smtps(certs)
        client = MemoryTlsClient(certs, reader, writer)
        with pytest.raises(ssl.SSLWantReadError):
            client.tls.do_handshake()  # the ClientHello, not sent yet
        writer.write(v2(("192.0.2.7", 40000), ("127.0.0.1", 465)) + client.outgoing.read())
        await client.handshake(then=b"EHLO client.test\r\n")
        lines = await client.lines(2)
        writer.close()
        return lines, log.getvalue()

    lines, log = run(loop_factory, scenario)
    assert lines[0] == b"220 mx.tern.test ESMTP Tern"  # over TLS, after the handshake
    assert lines[1] == b"250-mx.tern.test"
    assert "connect from unknown[192.0.2.7]" in log
    assert "Anonymous TLS connection established from unknown[192.0.2.7]: TLSv1.3" in log
    assert "SSL_accept error" not in log
