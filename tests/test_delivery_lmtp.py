"""The LMTP agent against Dovecot's LMTP server (a throwaway instance on loopback and a unix
socket), and the client core's LMTP mode fed bytes."""

import asyncio
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
from engine.delivery.route import nexthop_for
from engine.dns import Resolver
from engine.smtp.client import Client, Envelope, NeedData, Ready, Send, TransactionDone

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


def check_per_recipient_results(outcome, peer, relay, dovecot):
    bob, nobody, carol = outcome.results
    assert (bob.recipient, bob.status, bob.dsn, bob.relay) == ("bob", "sent", "2.0.0", relay)
    assert bob.reply.startswith("250 2.0.0 <bob> ") and bob.reply.endswith(" Saved")
    assert (nobody.status, nobody.dsn, nobody.reply) == (
        "bounced", "5.1.1", f"host {peer} said: 550 5.1.1 "
        "<nobody1> User doesn't exist: nobody1 (in reply to RCPT TO command)")
    assert (carol.status, carol.dsn) == ("bounced", "5.2.2")
    assert carol.reply.endswith("said: 552 5.2.2 <carol> Quota exceeded (mailbox for user is "
                                "full) (in reply to end of DATA command)")
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
