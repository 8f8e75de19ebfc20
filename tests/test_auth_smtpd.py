"""AUTH through the smtpd adapter over real loopback sockets: smtplib and swaks as clients,
passwords checked off the event loop, relay for authenticated clients, the submission
listener, the per-address failure limit, and logs that never hold a password."""

import asyncio
import base64
import io
import ipaddress
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from engine.auth import schemes
from engine.auth.passwd_file import PasswordFile
from engine.cleanup import Cleanup
from engine.config import Config, Listener
from engine.log import Maillog
from engine.smtpd.anvil import Anvil
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.memory import MemorySpool

USERS = {  # user → (scheme, password)
    "alice@example.test": ("BLF-CRYPT", "correct horse battery"),
    "bob": ("SHA512-CRYPT", "b0b's pa$$word"),  # smtplib sends only ASCII
    "carol": ("ARGON2ID", "carol:pw with spaces"),
}
ALICE_PASSWORD = USERS["alice@example.test"][1]
OUTSIDE = ipaddress.ip_network("192.0.2.0/24")  # mynetworks without loopback: no free relay


@pytest.fixture(scope="module")
def passwd(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "passwd"
    path.write_text("".join(f"{user}:{schemes.make_hash(scheme, password.encode())}\n"
                            for user, (scheme, password) in USERS.items()))
    return path


class AuthServer:
    """SmtpdProtocol on its own event loop in a thread, so that blocking clients (smtplib,
    swaks) can talk to it; the spool is in memory, the maillog a string."""

    def __init__(self, passwd, service: str = "smtp", *, anvil: Anvil | None = None,
                 authenticator: PasswordFile | None = None, **settings) -> None:
        options = {"myhostname": "mx.test", "mynetworks": (OUTSIDE,),
                   "smtpd_sasl_password_file": str(passwd), "smtpd_sasl_auth_enable": True,
                   "smtpd_tls_auth_only": False}
        options.update(settings)
        self.config = Config(**options)
        self.spool = MemorySpool()
        self.log_stream = io.StringIO()
        self.anvil = anvil if anvil is not None else Anvil()  # (an empty Anvil is falsy)
        self.authenticator = authenticator
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(service, started), daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.address = ("127.0.0.1", self.port)

    def _run(self, service: str, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            maillog = Maillog("mx.test", stream=self.log_stream)
            context = SmtpdContext(config=self.config, maillog=maillog,
                                   cleanup=Cleanup(self.spool, maillog, self.config),
                                   listener=Listener(service=service), anvil=self.anvil,
                                   authenticator=self.authenticator)
            self.server = await self.loop.create_server(lambda: SmtpdProtocol(context),
                                                        "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

        self.loop.run_until_complete(start())
        started.set()
        self.loop.run_forever()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def log(self) -> str:
        return self.log_stream.getvalue()

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (log := self.log()).count(text) >= count:
                return log
            time.sleep(0.02)
        raise AssertionError(f"{count}x {text!r} not in maillog:\n{self.log()}")


@pytest.fixture
def auth_server(passwd):
    servers = []

    def make(**settings):
        server = AuthServer(passwd, **settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def read_reply(stream) -> str:
    """The next whole reply's last line."""
    while (line := stream.readline().decode())[3:4] == "-":
        pass
    return line.rstrip()


def raw_session(address, data: bytes, replies: int) -> list[str]:
    """Say EHLO (and wait for the reply: smtpd_forbid_unauth_pipelining), then send ``data``
    in one write; the first ``replies`` final reply lines to it."""
    with socket.create_connection(address, timeout=10) as sock:
        stream = sock.makefile("rb")
        stream.readline()  # greeting
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(stream).startswith("250 ")
        sock.sendall(data)
        out = []
        while len(out) < replies:
            line = stream.readline().decode()
            assert line, f"connection closed after {out}"
            if line[3:4] == " ":
                out.append(line.rstrip())
        return out


# -- smtplib --------------------------------------------------------------------------------


def test_smtplib_login_then_relay_with_esmtpa_and_postfix_log_line(auth_server):
    server = auth_server()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("auth") and client.esmtp_features["auth"].split() == [
            "PLAIN", "LOGIN"]
        assert client.login("alice@example.test", ALICE_PASSWORD) == (
            235, b"2.7.0 Authentication successful")
        refused = client.sendmail("a@example.org", ["x@example.net"], b"Subject: t\r\n\r\nhi\r\n")
    assert refused == {}
    (envelope,) = server.spool.envelopes()
    assert [r.address for r in envelope.recipients] == ["x@example.net"]
    content = server.spool.content(envelope.queue_id)
    assert b"with ESMTPA id " + envelope.queue_id.encode() in content
    server.wait_log(f"{envelope.queue_id}: client=unknown[127.0.0.1], sasl_method=PLAIN, "
                    "sasl_username=alice@example.test\n")


@pytest.mark.parametrize("user", sorted(USERS))
@pytest.mark.parametrize("initial_response", [True, False])
def test_smtplib_login_mechanism_for_every_scheme(auth_server, user, initial_response):
    server = auth_server()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        client.user, client.password = user, USERS[user][1]
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response)
        assert code == 235
        client.mail("a@example.org")
        assert client.rcpt("x@example.net")[0] == 250
    server.wait_log(f"sasl_method=LOGIN, sasl_username={user}\n")


def test_wrong_password_and_unknown_user_are_535(auth_server):
    server = auth_server()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        for user, password in (("alice@example.test", "wrong"), ("nobody", ALICE_PASSWORD)):
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                client.login(user, password)
            assert info.value.smtp_code == 535
            assert info.value.smtp_error == (b"5.7.8 Error: authentication failed: "
                                             b"authentication failure")
        client.mail("a@example.org")
        assert client.rcpt("x@example.net") == (554, b"5.7.1 <x@example.net>: Relay access denied")
    server.wait_log("warning: unknown[127.0.0.1]: SASL PLAIN authentication failed: "
                    "authentication failure", count=2)


def test_relay_is_denied_without_auth(auth_server):
    server = auth_server()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        assert client.rcpt("x@example.net") == (554, b"5.7.1 <x@example.net>: Relay access denied")
    assert server.spool.envelopes() == []


def test_auth_is_not_offered_without_tls_by_default(auth_server):
    server = auth_server(smtpd_tls_auth_only=True)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", f"PLAIN {plain('alice@example.test', ALICE_PASSWORD)}") == (
            504, b"5.5.4 Encryption required for requested authentication mechanism")


def test_auth_is_not_enabled_on_a_plain_smtp_listener_by_default(auth_server):
    server = auth_server(smtpd_sasl_auth_enable=False)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN") == (503, b"5.5.1 Error: authentication not enabled")


# -- the submission listener -----------------------------------------------------------------


def test_submission_requires_auth_before_mail(auth_server):
    server = auth_server(service="submission", smtpd_sasl_auth_enable=False)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.org") == (530, b"5.7.0 Authentication required")
        client.login("bob", USERS["bob"][1])
        assert client.mail("a@example.org")[0] == 250
        assert client.rcpt("x@example.net")[0] == 250


def test_pipelined_commands_after_auth_are_answered_in_order(auth_server):
    """Checked off the loop, the password's answer still comes before MAIL's and RCPT's."""
    server = auth_server(service="submission")
    batch = (f"AUTH PLAIN {plain('carol', USERS['carol'][1])}\r\n"  # RFC 4954 §4: allowed
             "MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.net>\r\nQUIT\r\n").encode()
    assert raw_session(server.address, batch, 4) == [
        "235 2.7.0 Authentication successful", "250 2.1.0 Ok", "250 2.1.5 Ok", "221 2.0.0 Bye"]


# -- failure limit ----------------------------------------------------------------------------


def test_failures_reach_the_limit_then_421_and_the_address_is_refused(auth_server):
    server = auth_server(smtpd_client_auth_failure_limit=3)
    wrong = plain("alice@example.test", "guess")
    with socket.create_connection(server.address, timeout=10) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(b"EHLO client.test\r\n")
        read_reply(stream)
        sock.sendall(f"AUTH PLAIN {wrong}\r\n".encode() * 3)
        answer = stream.read().decode()  # until the server closes
    lines = [line for line in answer.split("\r\n") if line]
    failure = "535 5.7.8 Error: authentication failed: authentication failure"
    assert lines == [failure, failure, failure,
                     "421 4.7.0 mx.test Error: too many authentication failures"]
    # a new connection from the same address: even the right password is refused at AUTH
    right = plain("alice@example.test", ALICE_PASSWORD)
    with socket.create_connection(server.address, timeout=10) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(b"EHLO client.test\r\n")
        read_reply(stream)
        sock.sendall(f"AUTH PLAIN {right}\r\n".encode())
        answer = stream.read().decode()  # until the server closes
    assert answer == "421 4.7.0 mx.test Error: too many authentication failures\r\n"
    log = server.wait_log("disconnect from unknown[127.0.0.1]", count=2)
    assert log.count("SASL PLAIN authentication failed") == 3
    assert log.count("warning: Authentication failure limit exceeded: 3 from "
                     "unknown[127.0.0.1] for service smtp") == 2
    assert "lost connection" not in log


def test_the_refusal_ends_with_anvils_time_unit(auth_server):
    now = [1000.0]
    server = auth_server(smtpd_client_auth_failure_limit=2,
                         anvil=Anvil(time_unit=60.0, clock=lambda: now[0]))
    wrong = f"AUTH PLAIN {plain('bob', 'x')}\r\n".encode()
    assert raw_session(server.address, wrong * 2, 3)[2] == (
        "421 4.7.0 mx.test Error: too many authentication failures")
    right = f"AUTH PLAIN {plain('bob', USERS['bob'][1])}\r\n".encode()
    now[0] += 59.0
    assert raw_session(server.address, right, 1) == [
        "421 4.7.0 mx.test Error: too many authentication failures"]
    now[0] += 1.0  # the window that counted the failures is over
    assert raw_session(server.address, right, 1) == ["235 2.7.0 Authentication successful"]


def test_anvil_exceptions_are_not_limited(auth_server):
    """As Postfix's anvil limits: smtpd_client_event_limit_exceptions ($mynetworks) are exempt."""
    server = auth_server(smtpd_client_auth_failure_limit=1,
                         mynetworks=(ipaddress.ip_network("127.0.0.0/8"),))
    wrong = f"AUTH PLAIN {plain('bob', 'x')}\r\n".encode()
    failure = "535 5.7.8 Error: authentication failed: authentication failure"
    assert raw_session(server.address, wrong * 2 + b"QUIT\r\n", 3) == [
        failure, failure, "221 2.0.0 Bye"]


def test_mail_without_auth_still_works_for_a_client_over_the_limit(auth_server):
    """Only AUTH is refused to the address; it may still send to our own domains."""
    server = auth_server(smtpd_client_auth_failure_limit=1, relay_domains=("example.net",))
    assert raw_session(server.address, f"AUTH PLAIN {plain('bob', 'x')}\r\n".encode(), 2)[1] == (
        "421 4.7.0 mx.test Error: too many authentication failures")
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.sendmail("a@example.org", ["x@example.net"], b"\r\nhi\r\n") == {}


class GatedPasswordFile(PasswordFile):
    """The real table, whose checks wait until the test opens the gate."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def authenticate(self, username, password):
        self.waiting.set()
        assert self.gate.wait(10)
        return super().authenticate(username, password)


def test_password_checks_do_not_block_other_sessions(auth_server, passwd):
    """While one client's password is being checked, the loop serves another client."""
    table = GatedPasswordFile(passwd)
    server = auth_server(authenticator=table)
    with socket.create_connection(server.address, timeout=10) as first:
        stream = first.makefile("rb")
        stream.readline()
        first.sendall(b"EHLO client.test\r\n")
        read_reply(stream)
        first.sendall(f"AUTH PLAIN {plain('bob', USERS['bob'][1])}\r\nNOOP\r\n".encode())
        assert table.waiting.wait(10)
        assert raw_session(server.address, b"NOOP\r\n", 1) == ["250 2.0.0 Ok"]
        table.gate.set()
        assert stream.readline() == b"235 2.7.0 Authentication successful\r\n"
        assert stream.readline() == b"250 2.0.0 Ok\r\n"


# -- logs ---------------------------------------------------------------------------------


def test_the_maillog_never_holds_a_password(auth_server):
    server = auth_server(smtpd_client_auth_failure_limit=0)
    secrets, outcomes = [], []
    for user, (_, password) in USERS.items():
        for attempt in (password, password + "!"):  # right, then wrong
            secrets += [attempt, plain(user, attempt),
                        base64.b64encode(attempt.encode()).decode()]
            for mechanism in ("PLAIN", "LOGIN"):
                with smtplib.SMTP(*server.address, timeout=10) as client:
                    client.ehlo("client.test")
                    client.user, client.password = user, attempt
                    method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
                    try:
                        outcomes.append(client.auth(mechanism, method)[0])
                    except smtplib.SMTPAuthenticationError as error:
                        outcomes.append(error.smtp_code)
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.docmd("AUTH LOGIN")[0] == 334
        assert client.docmd(base64.b64encode(b"bob").decode())[0] == 334
        assert client.docmd("*") == (501, b"5.7.0 Authentication aborted")
    assert outcomes == [235, 235, 535, 535] * len(USERS)
    log = server.wait_log("disconnect from", count=4 * len(USERS) + 1)
    assert log.count("authentication failed: authentication failure") == 2 * len(USERS)
    assert "warning: unknown[127.0.0.1]: SASL LOGIN authentication aborted" in log
    for secret in secrets:
        assert secret not in log
        assert secret.encode().hex() not in log


@pytest.mark.parametrize("data, warning", [
    (b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHMzY3JldFBX\r\n", "improper command pipelining after EHLO"),
    (b"AUTH PLAIN AGFsaWNlAHMzY3JldFBX\0\r\n", "NUL character in command"),
    (b"AUTH LOGIN\r\nYWxpY2U=\r\nczNjcmV0UFc=\r\n", "SASL LOGIN authentication failed"),
])
def test_warnings_that_quote_input_never_hold_a_password(auth_server, data, warning):
    """Warnings that quote what the client sent (pipelining, NUL) redact AUTH: only "AUTH MECH"
    is shown, never the initial response, a pipelined SASL response or the decoded password."""
    server = auth_server(smtpd_forbid_unauth_pipelining=True)
    raw_session(server.address, data, replies=1)
    log = server.wait_log(warning)
    if "AUTH PLAIN" in data.decode():
        assert log.split(warning, 1)[1].splitlines()[0].endswith("AUTH PLAIN ...")
    for secret in ("AGFsaWNlAHMzY3JldFBX", "s3cretPW", "czNjcmV0UFc=", "YWxpY2U="):
        assert secret not in log
        assert secret.encode().hex() not in log


# -- swaks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth(auth_server, mechanism):
    server = auth_server()

    def swaks(password):
        return subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{server.port}", "--ehlo", "client.test",
             "--auth", mechanism, "--auth-user", "bob", "--auth-password", password,
             "--from", "a@example.org", "--to", "x@example.net", "--timeout", "10"],
            capture_output=True, text=True, timeout=60)

    done = swaks(USERS["bob"][1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<-  235 2.7.0 Authentication successful" in done.stdout
    assert "<-  250 2.0.0 Ok: queued as " in done.stdout
    failed = swaks("not it")
    assert failed.returncode != 0
    assert "535 5.7.8 Error: authentication failed: authentication failure" in failed.stdout
    assert len(server.spool.envelopes()) == 1
    server.wait_log(f"sasl_method={mechanism}, sasl_username=bob\n")
