"""The LMTP agent against Dovecot's LMTP server (a throwaway instance on loopback and a unix
socket), and the client core's LMTP mode fed bytes."""

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from peers import free_port

from engine.config import Config, load_config
from engine.delivery import DeliveryRequest, NextHop, TransientFailure
from engine.delivery import lmtp as lmtp_agent
from engine.delivery import smtp as smtp_agent
from engine.delivery.route import nexthop_for
from engine.dns import Resolver
from engine.smtp.client import (
    Client,
    Envelope,
    NeedData,
    Ready,
    Send,
    Stage,
    TransactionDone,
)

CONTENT = b"Subject: via lmtp\r\n\r\nhello\r\n.dot line\r\n"
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
needs_dovecot = pytest.mark.skipif(not os.path.exists(DOVECOT), reason="dovecot not installed")

CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
first_valid_uid = 1
{identity}
mail_location = maildir:~/Maildir
mail_plugins = quota
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
userdb {{
  driver = passwd-file
  args = {dir}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
"""


class Dovecot:
    """A throwaway Dovecot LMTP server: users bob, dave and carol (carol's quota is 10 bytes,
    so her copy fails after the final dot), mail in Maildirs under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.socket = directory / "run" / "lmtp"
        if os.geteuid() == 0:
            uid = gid = 65534
            identity = ""
        else:
            uid, gid = os.getuid(), os.getgid()
            me = pwd.getpwuid(uid).pw_name
            identity = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        mail = directory / "mail"
        mail.mkdir(mode=0o777)
        mail.chmod(0o777)
        (directory / "users").write_text(
            f"bob:{{PLAIN}}x:{uid}:{gid}::{mail}/bob::\n"
            f"dave:{{PLAIN}}x:{uid}:{gid}::{mail}/dave::\n"
            f"carol:{{PLAIN}}x:{uid}:{gid}::{mail}/carol::userdb_quota_rule=*:storage=10B\n")
        self.conf = directory / "dovecot.conf"
        self.conf.write_text(CONF.format(dir=directory, port=self.port, identity=identity))
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.log()}")
            if self.socket.exists():
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start: {self.log()}")

    def log(self) -> str:
        path = self.directory / "dovecot.log"
        return path.read_text() if path.exists() else ""

    def messages(self, user: str) -> list[bytes]:
        new = self.directory / "mail" / user / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def dovecot():
    directory = Path(tempfile.mkdtemp(prefix="tern-dovecot-"))
    directory.chmod(0o755)
    server = Dovecot(directory)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def run(coro):
    return asyncio.run(coro)


def lmtp_request(nexthop: NextHop, recipients=("bob", "nobody1", "carol")):
    return DeliveryRequest("4Lmtp", "alice@example.org", list(recipients), CONTENT, nexthop)


def check_per_recipient_results(outcome, peer, relay, dovecot, command="BDAT"):
    """bob saved, nobody1 refused at RCPT, carol over quota after the content: Dovecot 2.3
    offers CHUNKING, so the content goes as BDAT unless it is discarded."""
    bob, nobody, carol = outcome.results
    assert (bob.recipient, bob.status, bob.dsn, bob.relay) == ("bob", "sent", "2.0.0", relay)
    assert bob.reply.startswith("250 2.0.0 <bob> ") and bob.reply.endswith(" Saved")
    assert (nobody.status, nobody.dsn, nobody.reply) == (
        "bounced", "5.1.1", f"host {peer} said: 550 5.1.1 "
        "<nobody1> User doesn't exist: nobody1 (in reply to RCPT TO command)")
    assert (carol.status, carol.dsn) == ("bounced", "5.2.2")
    assert carol.reply.endswith("said: 552 5.2.2 <carol> Quota exceeded (mailbox for user is "
                                f"full) (in reply to {command} command)")
    (message,) = dovecot.messages("bob")
    assert message.endswith(b"\nSubject: via lmtp\n\nhello\n.dot line\n")
    assert dovecot.messages("carol") == []


@needs_dovecot
def test_lmtp_over_tcp_with_per_recipient_replies(dovecot):
    config = Config(myhostname="client.tern.test")
    hop = NextHop("lmtp", "127.0.0.1", dovecot.port, False)
    outcome = run(lmtp_agent.deliver(lmtp_request(hop), config, Resolver(config)))
    check_per_recipient_results(outcome, "127.0.0.1[127.0.0.1]",
                                f"127.0.0.1[127.0.0.1]:{dovecot.port}", dovecot)
    assert "Connect from 127.0.0.1" in dovecot.log()


@needs_dovecot
def test_lmtp_over_a_unix_socket(dovecot, tmp_path):
    path = tmp_path / "tern.toml"
    path.write_text(f'myhostname = "client.tern.test"\n[transport_maps]\n'
                    f'"mail.test" = "lmtp:unix:{dovecot.socket}"\n')
    config = load_config(path)
    hop = nexthop_for("mail.test", config)
    assert hop == NextHop("lmtp", f"unix:{dovecot.socket}", 0, False)
    outcome = run(lmtp_agent.deliver(lmtp_request(hop), config, Resolver(config)))
    peer = f"client.tern.test[{dovecot.socket}]"
    check_per_recipient_results(outcome, peer, peer, dovecot)


@needs_dovecot
def test_all_recipients_accepted_each_get_a_reply(dovecot):
    config = Config(myhostname="client.tern.test")
    hop = NextHop("lmtp", f"unix:{dovecot.socket}", 0, False)
    outcome = run(lmtp_agent.deliver(lmtp_request(hop, ("bob", "dave")), config,
                                     Resolver(config)))
    assert [(r.status, r.reply[:14]) for r in outcome.results] == [
        ("sent", "250 2.0.0 <bob"), ("sent", "250 2.0.0 <dav")]
    assert len(dovecot.messages("bob")) == len(dovecot.messages("dave")) == 1


def test_unreachable_lmtp_socket_defers(tmp_path):
    config = Config(myhostname="client.tern.test")
    hop = NextHop("lmtp", f"unix:{tmp_path}/none", 0, False)
    with pytest.raises(TransientFailure) as caught:
        run(lmtp_agent.deliver(lmtp_request(hop), config, Resolver(config)))
    assert caught.value.text == f"connect to {tmp_path}/none: No such file or directory"


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_a_refused_lmtp_session_defers_with_a_4xx_code(over, tmp_path):
    """A 5xx greeting or LHLO reply defers (Postfix's smtp_skip_5xx_greeting), over a unix
    socket as over TCP: the result's code is 4.x.x, never a 5.x.x with status=deferred."""
    async def refuse_greeting(reader, writer):
        writer.write(b"554 5.3.2 not today\r\n")
        await writer.drain()
        with contextlib.suppress(OSError):
            await reader.read(100)
        writer.close()

    async def refuse_lhlo(reader, writer):
        writer.write(b"220 lmtp.test ready\r\n")
        await reader.readline()
        writer.write(b"550 5.5.1 no LHLO\r\n")
        await writer.drain()
        with contextlib.suppress(OSError):
            await reader.read(100)
        writer.close()

    async def attempt(handler):
        if over == "unix":
            path = f"{tmp_path}/{handler.__name__}.sock"
            server = await asyncio.start_unix_server(handler, path)
            hop = NextHop("lmtp", f"unix:{path}", 0, False)
        else:
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            hop = NextHop("lmtp", "127.0.0.1", server.sockets[0].getsockname()[1], False)
        config = Config(myhostname="client.tern.test")
        try:
            with pytest.raises(TransientFailure) as caught:
                await lmtp_agent.deliver(lmtp_request(hop), config, Resolver(config))
        finally:
            server.close()
        return caught.value

    for handler, dsn, said in ((refuse_greeting, "4.3.2", "not today"),
                               (refuse_lhlo, "4.5.1", "no LHLO")):
        failure = run(attempt(handler))
        assert failure.dsn == dsn
        assert said in failure.text


def test_lmtp_tcp_default_port_is_24():
    config = Config(transport_maps={"a.test": "lmtp:[192.0.2.1]",
                                    "b.test": "lmtp:inet:h.test:2003"})
    assert nexthop_for("a.test", config) == NextHop("lmtp", "192.0.2.1", 24, False)
    assert nexthop_for("b.test", config) == NextHop("lmtp", "h.test", 2003, True)


# -- the client core's LMTP mode, fed bytes ------------------------------------------------------

def drive(client: Client, replies: list[bytes]) -> tuple[list[bytes], object]:
    """Feed ``replies`` one per NeedData; return what was sent and the first non-I/O event."""
    sent = []
    while True:
        event = client.next_event()
        if isinstance(event, Send):
            sent.append(event.data)
        elif isinstance(event, NeedData):
            client.receive_data(replies.pop(0))
        else:
            return sent, event


def test_client_lmtp_mode_lhlo_and_one_reply_per_recipient():
    client = Client("me.test", peer="lmtp[x]", relay="lmtp[x]", lmtp=True)
    sent, event = drive(client, [b"220 ready\r\n", b"250-lmtp\r\n250 PIPELINING\r\n"])
    assert sent == [b"LHLO me.test\r\n"] and isinstance(event, Ready)
    client.start_transaction(Envelope("s@x", ["a", "b", "c"], b"body\r\n"))
    sent, event = drive(client, [
        b"250 ok\r\n250 ok\r\n250 ok\r\n", b"550 5.1.1 no c\r\n354 go\r\n",
        b"250 2.0.0 <a> saved\r\n", b"452 4.2.2 <b> over quota\r\n"])
    assert sent == [b"MAIL FROM:<s@x>\r\nRCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nDATA\r\n",
                    b"body\r\n.\r\n"]
    assert isinstance(event, TransactionDone)
    assert [(r.status, r.dsn, r.reply) for r in event.results] == [
        ("sent", "2.0.0", "250 2.0.0 <a> saved"),
        ("deferred", "4.2.2", "host lmtp[x] said: 452 4.2.2 <b> over quota "
                              "(in reply to end of DATA command)"),
        ("bounced", "5.1.1", "host lmtp[x] said: 550 5.1.1 no c (in reply to RCPT TO command)"),
    ]


def test_client_lmtp_lhlo_refused_has_no_helo_fallback():
    client = Client("me.test", peer="p", lmtp=True)
    sent, event = drive(client, [b"220 ready\r\n", b"500 5.5.1 what\r\n"])
    assert sent == [b"LHLO me.test\r\n"]
    assert event.text == "host p said: 500 5.5.1 what (in reply to LHLO command)"


def test_client_lmtp_bdat_last_gets_one_reply_per_recipient():
    """RFC 2033 §4.3 + RFC 3030: with CHUNKING the content goes as BDAT, one chunk a reply,
    and BDAT LAST gets one reply per accepted recipient, in RCPT order."""
    client = Client("me.test", peer="lmtp[x]", relay="lmtp[x]", lmtp=True, chunk_size=8)
    sent, event = drive(client, [b"220 ready\r\n",
                                 b"250-lmtp\r\n250-PIPELINING\r\n250 CHUNKING\r\n"])
    client.start_transaction(Envelope("s@x", ["a", "b", "c", "d"], b"0123456789abc"))
    sent, event = drive(client, [
        b"250 ok\r\n250 ok\r\n250 ok\r\n", b"550 5.1.1 no c\r\n250 ok\r\n",
        b"250 2.0.0 8 octets\r\n", b"250 2.0.0 <a> saved\r\n",
        b"452 4.2.2 <b> over quota\r\n250 2.0.0 <d> saved\r\n"])
    assert sent == [
        b"MAIL FROM:<s@x>\r\nRCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n",
        b"BDAT 8\r\n01234567", b"BDAT 7 LAST\r\n89abc\r\n"]
    assert isinstance(event, TransactionDone)
    assert [(r.status, r.dsn, r.reply) for r in event.results] == [
        ("sent", "2.0.0", "250 2.0.0 <a> saved"),
        ("deferred", "4.2.2", "host lmtp[x] said: 452 4.2.2 <b> over quota "
                              "(in reply to BDAT command)"),
        ("bounced", "5.1.1", "host lmtp[x] said: 550 5.1.1 no c (in reply to RCPT TO command)"),
        ("sent", "2.0.0", "250 2.0.0 <d> saved"),
    ]
    client.quit()
    assert drive(client, [b"221 bye\r\n"])[0] == [b"QUIT\r\n"]


def test_client_lmtp_failed_chunk_sends_no_bdat_last():
    """A chunk refused before the last: every accepted recipient gets that reply, and no BDAT
    LAST goes out (so no per-recipient replies are waited for)."""
    client = Client("me.test", peer="p", relay="p", lmtp=True, chunk_size=4,
                    pipelining=False)
    drive(client, [b"220 ready\r\n", b"250-lmtp\r\n250 CHUNKING\r\n"])
    client.start_transaction(Envelope("s@x", ["a", "b"], b"0123456789"))
    sent, event = drive(client, [b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n",
                                 b"250 2.0.0 4 octets\r\n", b"554 5.6.0 bad chunk\r\n"])
    assert sent == [b"MAIL FROM:<s@x>\r\n", b"RCPT TO:<a>\r\n", b"RCPT TO:<b>\r\n",
                    b"BDAT 4\r\n0123", b"BDAT 4\r\n4567"]
    assert [(r.status, r.dsn) for r in event.results] == [("bounced", "5.6.0")] * 2
    client.quit()
    assert drive(client, [b"221 bye\r\n"])[0] == [b"QUIT\r\n"]


def test_client_lmtp_discarded_chunking_sends_data():
    client = Client("me.test", peer="p", lmtp=True, discard_ehlo_keywords=["chunking"])
    drive(client, [b"220 ready\r\n", b"250-lmtp\r\n250-PIPELINING\r\n250 CHUNKING\r\n"])
    client.start_transaction(Envelope("s@x", ["a"], b"x\r\n"))
    sent, event = drive(client, [b"250 ok\r\n250 ok\r\n354 go\r\n", b"250 2.0.0 <a> ok\r\n"])
    assert sent == [b"MAIL FROM:<s@x>\r\nRCPT TO:<a>\r\nDATA\r\n", b"x\r\n.\r\n"]
    assert event.results[0].status == "sent"


class Tap:
    """A loopback TCP relay in front of a server that keeps what the client sent, so a test
    can tell which commands went to the real server."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sent = bytearray()
        self.relays: set[asyncio.Task] = set()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        if self.relays:  # both sides are done after QUIT: let the relays see their EOFs
            await asyncio.wait(self.relays, timeout=10)
        for task in self.relays:
            task.cancel()
        await asyncio.gather(*self.relays, return_exceptions=True)
        await self.server.wait_closed()

    async def _relay(self, reader, writer) -> None:
        self.relays.add(asyncio.current_task())
        up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

            async def pump(source, sink, keep) -> None:
                while data := await source.read(65536):
                    if keep:
                        self.sent += data
                    sink.write(data)
                    await sink.drain()
                sink.close()

            async with asyncio.timeout(30):
                await asyncio.gather(pump(reader, up_writer, True),
                                     pump(up_reader, writer, False), return_exceptions=True)
        finally:
            for side in (writer, up_writer):
                if side is not None:
                    side.close()
                    with contextlib.suppress(Exception):
                        await side.wait_closed()


async def deliver_through_tap(dovecot, config, recipients):
    async with Tap(dovecot.port) as tap:
        hop = NextHop("lmtp", "127.0.0.1", tap.port, False)
        request = DeliveryRequest("4Lmtp", "alice@example.org", list(recipients), CONTENT, hop)
        outcome = await lmtp_agent.deliver(request, config, Resolver(config))
    return outcome, bytes(tap.sent)


@needs_dovecot
def test_lmtp_bdat_to_dovecot_with_per_recipient_replies(dovecot, monkeypatch):
    """Dovecot 2.3 offers CHUNKING: the message goes as several BDAT chunks and each
    recipient gets its own reply after BDAT LAST (bob and dave saved, carol over quota)."""
    monkeypatch.setattr(smtp_agent, "CHUNK_SIZE", 16)
    config = Config(myhostname="client.tern.test")
    outcome, sent = run(deliver_through_tap(dovecot, config, ("bob", "nobody1", "carol",
                                                              "dave")))
    assert b"DATA\r\n" not in sent
    assert sent.endswith(b"RCPT TO:<dave>\r\nBDAT 16\r\nSubject: via lmtBDAT 16\r\np\r\n\r\n"
                         b"hello\r\n.dotBDAT 7 LAST\r\n line\r\nQUIT\r\n")
    bob, nobody, carol, dave = outcome.results
    assert (bob.status, dave.status, nobody.status, carol.status) == (
        "sent", "sent", "bounced", "bounced")
    assert bob.reply.startswith("250 2.0.0 <bob> ") and dave.reply.startswith("250 2.0.0 <dave> ")
    assert nobody.reply.endswith("(in reply to RCPT TO command)")
    assert (carol.dsn, carol.reply.endswith(
        "said: 552 5.2.2 <carol> Quota exceeded (mailbox for user is full) "
        "(in reply to BDAT command)")) == ("5.2.2", True)
    for user in ("bob", "dave"):
        (message,) = dovecot.messages(user)
        assert message.endswith(b"\nSubject: via lmtp\n\nhello\n.dot line\n")
    assert dovecot.messages("carol") == []


@needs_dovecot
def test_lmtp_discard_lhlo_keywords_chunking_sends_data_to_dovecot(dovecot, tmp_path):
    path = tmp_path / "tern.toml"
    path.write_text('myhostname = "client.tern.test"\n'
                    'lmtp_discard_lhlo_keywords = ["CHUNKING"]\n')
    outcome, sent = run(deliver_through_tap(dovecot, load_config(path),
                                            ("bob", "nobody1", "carol")))
    assert b"BDAT" not in sent and b"\r\nDATA\r\n" in sent
    peer = "127.0.0.1[127.0.0.1]"
    relay = f"{peer}:{outcome.results[0].relay.rpartition(':')[2]}"
    check_per_recipient_results(outcome, peer, relay, dovecot, "end of DATA")


# -- lmtp_* settings: a stalled LMTP server ------------------------------------------------------

class StallingLmtp:
    """A loopback LMTP server that answers (no PIPELINING, no CHUNKING) until the command
    named by ``stall_at`` ("LHLO", "MAIL", "RCPT", "DATA" or "." for the end of the content),
    then stays silent with the connection open. Keeps the command lines it got."""

    def __init__(self, stall_at: str) -> None:
        self.stall_at = stall_at
        self.lines: list[bytes] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader, writer) -> None:
        replies = {b"LHLO": b"250-lmtp.test\r\n250 8BITMIME\r\n", b"MAIL": b"250 2.1.0 ok\r\n",
                   b"RCPT": b"250 2.1.5 ok\r\n", b"DATA": b"354 go\r\n"}
        writer.write(b"220 lmtp.test LMTP ready\r\n")
        try:
            async with asyncio.timeout(30):
                while line := await reader.readline():
                    self.lines.append(line)
                    verb = line[:4].upper()
                    if verb == b"DATA" and self.stall_at != "DATA":
                        writer.write(replies[verb])
                        while await reader.readline() not in (b".\r\n", b""):
                            pass
                        if self.stall_at == ".":
                            await reader.read()  # silent until the client gives up
                            break
                        writer.write(b"250 2.0.0 saved\r\n")
                    elif verb.decode() == self.stall_at:
                        await reader.read()
                        break
                    else:
                        writer.write(replies.get(verb, b"221 bye\r\n"))
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        writer.close()


STALLS = [
    ("LHLO", "lmtp_lhlo_timeout", "performing the LHLO handshake"),
    ("MAIL", "lmtp_mail_timeout", "sending MAIL FROM"),
    ("RCPT", "lmtp_rcpt_timeout", "sending RCPT TO"),
    ("DATA", "lmtp_data_init_timeout", "sending DATA command"),
    (".", "lmtp_data_done_timeout", "sending end of data -- message may be sent more than once"),
]
SMTP_TIMEOUTS = ("smtp_connect_timeout", "smtp_helo_timeout", "smtp_mail_timeout",
                 "smtp_rcpt_timeout", "smtp_data_init_timeout", "smtp_data_xfer_timeout",
                 "smtp_data_done_timeout", "smtp_quit_timeout", "smtp_rset_timeout")


@pytest.mark.parametrize("stall_at, key, doing", STALLS)
def test_stalled_lmtp_server_defers_after_the_lmtp_timeout(stall_at, key, doing):
    """The lmtp agent waits lmtp_*_timeout, not smtp_*_timeout (those are tiny here), then
    defers with Postfix's "conversation with … timed out while …"; LHLO says lmtp_lhlo_name."""
    config = Config(myhostname="client.tern.test", lmtp_lhlo_name="lhlo.tern.test",
                    **{name: 0.001 for name in SMTP_TIMEOUTS}, **{key: 0.3})

    async def attempt():
        async with StallingLmtp(stall_at) as server:
            hop = NextHop("lmtp", "127.0.0.1", server.port, False)
            started = time.monotonic()
            try:
                outcome = await lmtp_agent.deliver(lmtp_request(hop, ("bob",)), config,
                                                   Resolver(config))
            except TransientFailure as exc:
                outcome = exc
            return outcome, time.monotonic() - started, server.lines

    outcome, elapsed, lines = run(attempt())
    assert lines[0] == b"LHLO lhlo.tern.test\r\n"
    text = f"conversation with 127.0.0.1[127.0.0.1] timed out while {doing}"
    if stall_at == "LHLO":  # no session: the whole request defers
        assert (outcome.dsn, outcome.text) == ("4.4.2", text)
    else:
        (result,) = outcome.results
        assert (result.status, result.dsn, result.reply) == ("deferred", "4.4.2", text)
    assert elapsed >= 0.3


def test_each_client_stage_waits_its_lmtp_timeout():
    """Every stage of the shared I/O loop reads the lmtp_* twin under the lmtp agent."""
    names = {"lmtp_lhlo_timeout": 1.0, "lmtp_mail_timeout": 2.0, "lmtp_rcpt_timeout": 3.0,
             "lmtp_data_init_timeout": 4.0, "lmtp_data_xfer_timeout": 5.0,
             "lmtp_data_done_timeout": 6.0, "lmtp_quit_timeout": 7.0, "lmtp_rset_timeout": 8.0}
    view = lmtp_agent.lmtp_view(Config(**names))
    expected = {Stage.GREETING: 1.0, Stage.EHLO: 1.0, Stage.HELO: 1.0, Stage.STARTTLS: 1.0,
                Stage.AUTH: 1.0,  # Postfix: part of the EHLO stage
                Stage.MAIL: 2.0, Stage.RCPT: 3.0, Stage.DATA: 4.0, Stage.BODY: 5.0,
                Stage.DOT: 6.0, Stage.BDAT: 6.0, Stage.QUIT: 7.0, Stage.RSET: 8.0}
    assert {stage: smtp_agent._timeout(view, stage) for stage in Stage} == expected
    assert lmtp_agent.lmtp_view(Config()).smtp_data_done_timeout == 600.0
    # lmtp_connect_timeout: 0 (Postfix's default) leaves the connect to the system's limit
    assert lmtp_agent._connect_timeout(Config()) is None
    assert lmtp_agent._connect_timeout(Config(lmtp_connect_timeout=2.5)) == 2.5


@needs_dovecot
def test_smtputf8_message_to_dovecot_lmtp(dovecot):
    """Dovecot 2.3's LMTP offers no SMTPUTF8: a message that needs it (a UTF-8 sender)
    bounces 5.6.7 before MAIL FROM, as from the smtp agent; one that only asked for it goes
    on without the parameter."""
    config = Config(myhostname="client.tern.test")

    async def both():
        async with Tap(dovecot.port) as tap:
            hop = NextHop("lmtp", "127.0.0.1", tap.port, False)
            utf8 = DeliveryRequest("4Utf8", "jörg@example.org", ["bob"], CONTENT, hop,
                                   smtputf8=True)
            first = await lmtp_agent.deliver(utf8, config, Resolver(config))
            ascii_ = DeliveryRequest("4Asc", "jorg@example.org", ["dave"], CONTENT, hop,
                                     smtputf8=True)
            second = await lmtp_agent.deliver(ascii_, config, Resolver(config))
        return first, second, bytes(tap.sent)

    first, second, sent = run(both())
    assert [(r.status, r.dsn, r.reply) for r in first.results] == [
        ("bounced", "5.6.7", "SMTPUTF8 is required, but was not offered by host "
                             "127.0.0.1[127.0.0.1]")]
    assert "jörg".encode() not in sent and b"MAIL FROM:<jorg@example.org>\r\n" in sent
    assert second.results[0].status == "sent" and dovecot.messages("bob") == []
    assert len(dovecot.messages("dave")) == 1
