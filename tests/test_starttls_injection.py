"""STARTTLS response injection, client side (the CVE-2011-0411 class in reverse): plaintext a man
in the middle appends to the server's 220 must never be read as a reply under TLS. The client
ends the session instead (defer, 4.7.5), whether those bytes sit in the client core's reply
buffer or are still queued in asyncio's StreamReader behind it."""

import asyncio
import hashlib
import io
import socket
import ssl
import threading

import pytest
import uvloop
from tls_certs import make_certs

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop, TransientFailure
from engine.delivery.connections import Connection
from engine.delivery.smtp import _handshake, _PlaintextRetry, _TlsJob, deliver
from engine.dns import Resolver
from engine.log import Maillog
from engine.smtp.client import Client
from engine.tls.policy import TlsPolicy

# What the man in the middle wants the client to believe the TLS-protected server said.
FORGED = (b"250 forged-ehlo\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n"
          b"250 2.0.0 Ok: queued as FORGED\r\n221 bye\r\n")
HEAD = b"220 mitm ESMTP\r\n250-mitm\r\n250 STARTTLS\r\n220 2.0.0 go ahead\r\n"
TEXT = "Cannot start TLS: unexpected data after STARTTLS reply"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def fingerprint(certs) -> str:
    pem = certs.default_cert.read_text()
    der = ssl.PEM_cert_to_DER_cert(pem[:pem.index("-----END CERTIFICATE-----") + 25])
    return hashlib.sha256(der).hexdigest()


class InjectingServer:
    """Sends greeting, EHLO reply, STARTTLS's 220 and ``tail`` in one write, then a real TLS
    handshake with the test certificate, whose server refuses every recipient: a delivery can
    only succeed by believing the forged plaintext replies. Records every line it reads."""

    def __init__(self, certs, tail: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.tail = tail
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs.default_cert, certs.default_key)
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        with conn:
            try:
                conn.sendall(HEAD + self.tail)
                with conn.makefile("rb") as lines:
                    self.seen += [lines.readline(), lines.readline()]  # EHLO, STARTTLS
                tls = self.context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                return  # the client hung up before or during the handshake (as it must)
            with tls:
                self._dialogue(tls)

    def _dialogue(self, tls) -> None:
        """Only reached when the client wrongly went on: the real server under TLS."""
        try:
            for _ in range(20):
                line = tls.recv(4096)
                if not line:
                    break
                self.seen.append(b"TLS: " + line)
                if line.startswith(b"EHLO"):
                    tls.sendall(b"250 real\r\n")
                elif line.startswith(b"QUIT"):
                    tls.sendall(b"221 bye\r\n")
                    break
                else:
                    tls.sendall(b"550 5.1.1 the real server refuses\r\n")
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


def deliver_under_fingerprint(certs, tmp_path, server: InjectingServer):
    table = tmp_path / "tls_policy"
    table.write_text(f"[127.0.0.1]:{server.port} fingerprint match={fingerprint(certs)}\n")
    config = Config(myhostname="client.tern.test", smtp_connect_timeout=5.0,
                    smtp_starttls_timeout=10.0, smtp_helo_timeout=10.0,
                    smtp_tls_policy_maps=f"texthash:{table}")
    request = DeliveryRequest("4Xyz", "a@x.test", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n",
                              NextHop("smtp", "127.0.0.1", server.port, False))
    stream = io.StringIO()
    maillog = Maillog("client.tern.test", stream=stream)

    async def run():
        try:
            return await deliver(request, config, Resolver(config), maillog=maillog)
        except TransientFailure as exc:
            return exc

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run())
    server.close()
    maillog.flush()
    return result, stream.getvalue()


@pytest.mark.parametrize("tail", [
    pytest.param(FORGED, id="forged-replies-in-the-220s-packet"),
    pytest.param(b"X" * 70000 + b"\r\n" + FORGED, id="beyond-one-64KiB-read"),
])
def test_plaintext_behind_the_starttls_220_defers_and_is_never_believed(certs, tmp_path, tail):
    server = InjectingServer(certs, tail)
    result, log = deliver_under_fingerprint(certs, tmp_path, server)
    assert isinstance(result, TransientFailure), result  # never "sent" by the forged 250
    assert (result.dsn, result.text) == ("4.7.5", TEXT)
    assert (f"warning: 127.0.0.1[127.0.0.1]:{server.port} sent unexpected data after STARTTLS"
            " reply: possible response injection") in log
    assert "TLS connection established" not in log  # no handshake was even tried
    assert server.seen == [b"EHLO client.tern.test\r\n", b"STARTTLS\r\n"]


async def _handshake_with_bytes_in_the_stream_reader(level: str) -> BaseException | None:
    """The core read exactly up to the 220's CRLF; the forged replies wait in the StreamReader
    (what a >64 KiB write can leave there, made certain here by feeding the reader)."""
    accepted: list[asyncio.StreamWriter] = []
    listener = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reader.feed_data(FORGED)
    client = Client("client.tern.test", peer="mx[127.0.0.1]", relay="mx[127.0.0.1]:25",
                    starttls="require")
    job = _TlsJob(TlsPolicy(level), "mx", "mx", None)
    connection = Connection(client, reader, writer, tls=job)
    try:
        await _handshake(connection, Config(myhostname="client.tern.test"))
    except TransientFailure as exc:
        return exc
    finally:
        await connection.close()
        for server_side in accepted:
            server_side.close()
        listener.close()
        await listener.wait_closed()
    return None


@pytest.mark.parametrize(("level", "kind"), [("encrypt", TransientFailure),
                                             ("may", _PlaintextRetry)])
def test_bytes_queued_in_the_stream_reader_fail_before_the_handshake(level, kind):
    """Mandatory TLS defers; "may" treats it as a failed TLS start (plaintext on a new
    connection, as Postfix after a failed handshake). Never a handshake over those bytes."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        failure = runner.run(_handshake_with_bytes_in_the_stream_reader(level))
    assert type(failure) is kind
    assert (failure.dsn, failure.text) == ("4.7.5", TEXT)
