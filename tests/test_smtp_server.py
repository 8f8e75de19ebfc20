"""The SMTP server dialogue, driven by feeding bytes into the sans-I/O core (both reader twins)."""

import subprocess
import sys

import pytest

from engine.smtp import server
from engine.smtp.replies import Reply


class Driver:
    """Feeds bytes to a ServerSession and answers every request with accept(), unless a
    ``refuse`` rule gives a reply for it. Collects events and the replies sent."""

    def __init__(self, reader_class, refuse=None, **settings):
        options = {"hostname": "mx.example.test", "banner": "mx.example.test ESMTP Tern"}
        options.update(settings)
        self.session = server.ServerSession(server.Settings(**options), reader_class)
        self.refuse = refuse or (lambda event: None)
        self.events = []
        self.greeting = self.session.data_to_send()

    def send(self, data: bytes) -> list[str]:
        self.session.receive_data(data)
        return self.pump()

    def pump(self) -> list[str]:
        while (event := self.session.next_event()) is not None:
            self.events.append(event)
            if self.session.awaiting_answer:
                refusal = self.refuse(event)
                if refusal is None:
                    self.session.accept()
                else:
                    self.session.reject(refusal)
        return self.replies()

    def replies(self) -> list[str]:
        out = self.session.data_to_send().decode()
        return [line for line in out.split("\r\n") if line]

    def message(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, server.MessageChunk))


@pytest.fixture
def smtp(impl):
    reader_class = impl("reader").Reader

    def make(**kwargs):
        return Driver(reader_class, **kwargs)

    return make


def codes(lines):
    return [line[:3] for line in lines if line[3] == " "]


def test_greeting_is_220_banner(smtp):
    assert smtp().greeting == b"220 mx.example.test ESMTP Tern\r\n"


def test_ehlo_advertises_extensions(smtp):
    lines = smtp(message_size_limit=1000).send(b"EHLO client.test\r\n")
    assert lines[0] == "250-mx.example.test"
    assert lines[-1].startswith("250 ")
    keywords = {line[4:] for line in lines[1:]}
    assert {"PIPELINING", "SIZE 1000", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"} <= keywords


def test_helo_gets_single_line_250(smtp):
    assert smtp().send(b"HELO client.test\r\n") == ["250 mx.example.test"]


def test_helo_without_name_is_501(smtp):
    assert smtp().send(b"EHLO\r\n") == ["501 5.5.4 Syntax: EHLO hostname"]


def test_full_transaction_and_dot_unstuffing(smtp):
    d = smtp()
    d.send(b"EHLO c.test\r\n")
    assert d.send(b"MAIL FROM:<a@b.test>\r\n") == ["250 2.1.0 Ok"]
    assert d.send(b"RCPT TO:<x@y.test>\r\n") == ["250 2.1.5 Ok"]
    assert d.send(b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
    assert d.send(b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n") == ["250 2.0.0 Ok"]
    assert d.message() == b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
    assert d.send(b"QUIT\r\n") == ["221 2.0.0 Bye"]
    assert d.session.closed


def test_null_sender_size_and_body_parameters_accepted(smtp):
    d = smtp(message_size_limit=5000)
    d.send(b"EHLO c.test\r\n")
    assert d.send(b"MAIL FROM:<> SIZE=4000 BODY=8BITMIME\r\n") == ["250 2.1.0 Ok"]
    mail = [e for e in d.events if isinstance(e, server.MailFrom)][0]
    assert mail.sender == "" and mail.params == {"SIZE": "4000", "BODY": "8BITMIME"}


@pytest.mark.parametrize("line, reply", [
    (b"MAIL FROM:<a@b.test> SIZE=6000", "552 5.3.4 Message size exceeds fixed limit"),
    (b"MAIL FROM:<a@b.test> SIZE=big", "501 5.5.4 Bad SIZE keyword value"),
    (b"MAIL FROM:<a@b.test> BODY=9BIT", "501 5.5.4 Bad BODY keyword value"),
    (b"MAIL FROM:<a@b.test> FOO=1", "555 5.5.4 Unsupported option: FOO"),
    (b"MAIL FROM:a@b.test", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (b"MAIL TO:<a@b.test>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (b"MAIL FROM:<a b@c.test>", "501 5.1.7 Bad sender address syntax"),
    (b"MAIL FROM:<\xc3\xa9@b.test>", "553 5.6.7 Must declare SMTPUTF8 to send unicode address"),
])
def test_mail_from_errors(smtp, line, reply):
    d = smtp(message_size_limit=5000)
    assert d.send(line + b"\r\n") == [reply]
    assert d.session.state is server.State.IDLE


@pytest.mark.parametrize("line, reply", [
    (b"RCPT TO:<x@y..test>", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:x@y.test", "501 5.5.4 Syntax: RCPT TO:<address>"),
    (b"RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:<u@[1.2.3]>", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:<u@[IPv6:1.2.3.4]>", "501 5.1.3 Bad recipient address syntax"),
    (b"RCPT TO:<u@[::1]>", "501 5.1.3 Bad recipient address syntax"),
])
def test_rcpt_to_errors(smtp, line, reply):
    d = smtp()
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    assert d.send(line + b"\r\n") == [reply]


def test_rcpt_forms_accepted(smtp):
    d = smtp()
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    lines = d.send(b"RCPT TO:<postmaster>\r\nRCPT TO: <\"quoted@local\"@y.test>\r\n"
                   b"RCPT TO:<@relay.test:z@y.test>\r\nRCPT TO:<u@[127.0.0.1]>\r\n"
                   b"RCPT TO:<v@[IPv6:2001:db8::1]>\r\n")
    assert codes(lines) == ["250"] * 5
    recipients = [e.recipient for e in d.events if isinstance(e, server.RcptTo)]
    assert recipients == ["postmaster", '"quoted@local"@y.test', "z@y.test", "u@[127.0.0.1]",
                          "v@[IPv6:2001:db8::1]"]


@pytest.mark.parametrize("commands, reply", [
    (b"RCPT TO:<x@y.test>", "503 5.5.1 Error: need MAIL command"),
    (b"DATA", "503 5.5.1 Error: need RCPT command"),
    (b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>", "503 5.5.1 Error: nested MAIL command"),
])
def test_bad_sequence_is_503(smtp, commands, reply):
    assert smtp().send(commands + b"\r\n")[-1] == reply


def test_data_after_all_recipients_refused_is_554(smtp):
    refuse = lambda e: Reply(554, "5.7.1 no") if isinstance(e, server.RcptTo) else None  # noqa: E731
    d = smtp(refuse=refuse)
    lines = d.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
    assert lines == ["250 2.1.0 Ok", "554 5.7.1 no", "554 5.5.1 Error: no valid recipients"]


def test_unknown_command_is_502_and_empty_line_500(smtp):
    assert smtp().send(b"XYZZY\r\n\r\n") == ["502 5.5.2 Error: command not recognized",
                                             "500 5.5.2 Error: bad syntax"]


def test_vrfy_discloses_nothing(smtp):
    (line,) = smtp().send(b"VRFY root\r\n")
    assert line.startswith("252 2.0.0 ") and "root" not in line


def test_help_noop_rset(smtp):
    d = smtp()
    assert codes(d.send(b"HELP\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nRSET\r\n")) == [
        "214", "250", "250", "250"]
    assert d.session.state is server.State.IDLE
    assert any(isinstance(e, server.Reset) for e in d.events)


def test_pipelined_batch_answered_in_order_in_one_write(smtp):
    d = smtp()
    d.session.receive_data(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
                           b"RCPT TO:<bad\r\nRCPT TO:<z@y.test>\r\nDATA\r\n")
    lines = d.pump()
    assert codes(lines) == ["250", "250", "250", "501", "250", "354"]


def test_requests_hold_later_input_until_answered(smtp):
    d = smtp()
    d.session.receive_data(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
    assert isinstance(d.session.next_event(), server.MailFrom)
    assert d.session.next_event() is None  # waits for the answer; RCPT not parsed yet
    d.session.accept()
    assert isinstance(d.session.next_event(), server.RcptTo)


def test_recipient_limit_is_452_and_session_goes_on(smtp):
    d = smtp(recipient_limit=2)
    lines = d.send(b"MAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<x@y.test>\r\n" * 3 + b"DATA\r\n")
    assert codes(lines) == ["250", "250", "250", "452", "354"]
    assert lines[3] == "452 4.5.3 Error: too many recipients"


def test_over_long_command_line_is_500_and_session_goes_on(smtp):
    d = smtp(line_length_limit=100)
    lines = d.send(b"NOOP " + b"x" * 200 + b"\r\nNOOP\r\n")
    assert lines == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_message_end_can_be_refused_with_a_custom_reply(smtp):
    refuse = lambda e: (Reply(552, "5.3.4 Message size exceeds fixed limit")  # noqa: E731
                        if isinstance(e, server.MessageEnd) else None)
    d = smtp(refuse=refuse)
    d.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
    assert d.send(b"x\r\n.\r\nMAIL FROM:<a@b.test>\r\n") == [
        "552 5.3.4 Message size exceeds fixed limit", "250 2.1.0 Ok"]


def test_bare_lf_dot_does_not_end_data(smtp):
    d = smtp()
    d.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
    assert d.send(b"a\n.\nMAIL FROM:<evil@b.test>\r\n") == []
    assert d.session.state is server.State.DATA


def test_lost_connection_during_data_is_reported(smtp):
    d = smtp()
    d.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\npartial")
    d.session.receive_data(b"")
    d.pump()
    closed = d.events[-1]
    assert closed == server.Closed(during="DATA", quit=False)


def test_error_replies_carry_enhanced_status_codes(smtp):
    d = smtp(recipient_limit=1)
    lines = d.send(b"XYZ\r\nRCPT TO:<x@y.test>\r\nMAIL FROM:<bad\r\nMAIL FROM:<a@b.test>\r\n"
                   b"RCPT TO:<x@y.test>\r\nRCPT TO:<x@y.test>\r\nDATA extra\r\n")
    for line in lines:
        code, text = line[:3], line[4:]
        assert text[:1] == code[:1] and text[1] == "." and text.split()[0].count(".") == 2, line


def test_core_imports_no_io_modules():
    """The sans-I/O cores and the pure decision modules import no I/O library."""
    code = ("import sys, engine.smtp.server, engine.smtp.client, engine.smtp.grammar,"
            " engine.qmgr.scheduler, engine.cleanup, engine.policy.relay;"
            "print(sorted({'asyncio','socket','ssl','lmdb','dns','selectors'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("data, shown", [
    (b"NOOP\r\n", "NOOP\\r\\n"),
    (b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHMzY3JldFBX\r\n", "EHLO x\\r\\nAUTH PLAIN ..."),
    (b"auth login\r\nYWxpY2U=\r\nczNjcmV0UFc=\r\n", "AUTH login ..."),
    (b"AUTH PLAIN AGFsaWNlAHMzY3JldFBX\0\r\n", "AUTH PLAIN ..."),
    (b"NOOP\rAUTH PLAIN AGFsaWNlAHMzY3JldFBX", "NOOP\\rAUTH PLAIN ..."),
])
def test_logged_command_text_redacts_auth(data, shown):
    """Every warning that quotes client input (before the greeting, pipelining, NUL, PROXY)
    goes through escape_command: AUTH keeps only its mechanism."""
    assert server.escape_command(data) == shown
    assert server.escape_command(b"czNjcmV0UFc=\r\n", sasl_response=True) == "..."
