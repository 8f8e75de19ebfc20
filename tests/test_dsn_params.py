"""RFC 3461 DSN parameters: the value grammar, and MAIL/RCPT fed as bytes to the server core
(both reader twins): what the events carry, and Postfix's reply for every malformed form."""

import pytest
from test_smtp_server import Driver

from engine.smtp import grammar, server


@pytest.fixture
def smtp(impl):
    reader_class = impl("reader").Reader
    return lambda **kwargs: Driver(reader_class, **kwargs)


def events(driver, kind):
    return [event for event in driver.events if isinstance(event, kind)]


# -- the value grammar -------------------------------------------------------------------------

@pytest.mark.parametrize("text, ok", [
    ("", True),
    ("abc-123_x.y@z", True),
    ("!~*,<>", True),  # the edges of xchar
    ("a+2Bb+3D", True),  # "+" and "=" as hexchar
    ("a+2b", False),  # hexchar digits are upper case
    ("a+2", False),
    ("a+", False),
    ("a=b", False),
    ("a b", False),
    ("a\tb", False),
    ("\x7f", False),
    ("é", False),
])
def test_xtext_syntax(text, ok):
    assert bool(grammar.XTEXT.fullmatch(text)) is ok


def test_xtext_decode():
    assert grammar.xtext_decode("a+2Bb+3Dc+20") == "a+b=c "


@pytest.mark.parametrize("value, kept", [
    ("FULL", "FULL"), ("hdrs", "HDRS"), ("Full", "FULL"),
    ("", None), (None, None), ("HEADERS", None), ("FULL,HDRS", None),
])
def test_ret_values(value, kept):
    assert grammar.dsn_ret(value) == kept


@pytest.mark.parametrize("value, kept", [
    ("QQ314159", "QQ314159"),
    ("a+2Bb", "a+2Bb"),  # kept as given, not decoded
    ("a+20b", "a+20b"),  # a space is printable
    ("x" * 100, "x" * 100),
    ("x" * 101, None),
    ("", None), (None, None),
    ("a+00b", None),  # decodes to a control character
    ("a+7Fb", None),
    ("a+2bb", None),
    ("a=b", None),
])
def test_envid_values(value, kept):
    assert grammar.dsn_envid(value) == kept


@pytest.mark.parametrize("value, kept", [
    ("NEVER", "NEVER"),
    ("never", "NEVER"),
    ("SUCCESS", "SUCCESS"),
    ("delay,Failure", "FAILURE,DELAY"),  # canonical order
    ("DELAY,SUCCESS,FAILURE", "SUCCESS,FAILURE,DELAY"),
    ("SUCCESS,SUCCESS", "SUCCESS"),
    ("NEVER,NEVER", "NEVER"),
    ("", None), (None, None),
    ("NEVER,SUCCESS", None),  # NEVER stands alone
    ("SUCCESS,", None),
    (",SUCCESS", None),
    ("SUCCESS,,FAILURE", None),
    ("WARNING", None),
    ("SUCCESS;FAILURE", None),
])
def test_notify_values(value, kept):
    assert grammar.dsn_notify(value) == kept


@pytest.mark.parametrize("value, kept", [
    ("rfc822;x@y.test", "rfc822;x@y.test"),
    ("RFC822;x+2By@y.test", "RFC822;x+2By@y.test"),  # kept as given
    ("rfc822;", "rfc822;"),  # xtext may be empty (RFC 3461 §4)
    ("x-unknown-type;abc", "x-unknown-type;abc"),
    ("rfc822;x@y.test;z", "rfc822;x@y.test;z"),  # ";" (59) is an xchar
    ("rfc822;" + "x" * 493, "rfc822;" + "x" * 493),  # 500 characters
    ("rfc822;" + "x" * 494, None),
    ("", None), (None, None),
    ("x@y.test", None),  # no addr-type
    (";x@y.test", None),
    ("rfc 822;x@y.test", None),
    ("rfc822;x+2by@y.test", None),
    ("rfc822;x=y@y.test", None),
    ("rfc822;x+y@y.test", None),
])
def test_orcpt_values(value, kept):
    assert grammar.dsn_orcpt(value) == kept


# -- the dialogue ------------------------------------------------------------------------------

def test_ehlo_advertises_dsn(smtp):
    lines = smtp().send(b"EHLO client.test\r\n")
    assert "250-DSN" in lines or "250 DSN" in lines


def test_dsn_mail_and_rcpt_parameters_reach_the_events(smtp):
    d = smtp()
    lines = d.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test> RET=hdrs ENVID=QQ+2B314 SIZE=10\r\n"
                   b"RCPT TO:<x@y.test> NOTIFY=failure,success ORCPT=rfc822;x@y.test\r\n"
                   b"RCPT TO:<z@y.test> NOTIFY=NEVER\r\nRCPT TO:<w@y.test>\r\n")
    assert lines[-4:] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"]
    (mail,) = events(d, server.MailFrom)
    assert mail.params == {"RET": "HDRS", "ENVID": "QQ+2B314", "SIZE": "10"}
    assert [r.params for r in events(d, server.RcptTo)] == [
        {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x@y.test"}, {"NOTIFY": "NEVER"}, {}]


def test_parameter_keywords_are_case_insensitive(smtp):
    d = smtp()
    d.send(b"MAIL FROM:<a@b.test> ret=FULL EnVid=id1\r\n"
           b"RCPT TO:<x@y.test> notify=DELAY oRcPt=rfc822;x@y.test\r\n")
    assert events(d, server.MailFrom)[0].params == {"RET": "FULL", "ENVID": "id1"}
    assert events(d, server.RcptTo)[0].params == {"NOTIFY": "DELAY", "ORCPT": "rfc822;x@y.test"}


BAD_RET = "501 5.5.4 Bad RET parameter syntax"
BAD_ENVID = "501 5.5.4 Bad ENVID parameter syntax"
BAD_NOTIFY = "501 5.5.4 Error: Bad NOTIFY parameter syntax"
BAD_ORCPT = "501 5.5.4 Error: Bad ORCPT parameter syntax"


@pytest.mark.parametrize("params, reply", [
    (b"RET=", BAD_RET),
    (b"RET", BAD_RET),
    (b"RET=HEADERS", BAD_RET),
    (b"RET=FULL RET=FULL", BAD_RET),
    (b"RET=FULL ret=HDRS", BAD_RET),
    (b"ENVID=", BAD_ENVID),
    (b"ENVID", BAD_ENVID),
    (b"ENVID=a+2bc", BAD_ENVID),
    (b"ENVID=a+", BAD_ENVID),
    (b"ENVID=a+00", BAD_ENVID),
    (b"ENVID=" + b"x" * 101, BAD_ENVID),
    (b"ENVID=\xc3\xa9", BAD_ENVID),
    (b"ENVID=a ENVID=a", BAD_ENVID),
    (b"RET=XX ENVID=+zz", BAD_RET),  # left to right: the first error answers
    (b"NOTIFY=NEVER", "555 5.5.4 Unsupported option: NOTIFY"),  # a RCPT parameter
    (b"FOO=1 RET=FULL", "555 5.5.4 Unsupported option: FOO"),
])
def test_bad_mail_dsn_parameters(smtp, params, reply):
    d = smtp()
    assert d.send(b"MAIL FROM:<a@b.test> " + params + b"\r\n") == [reply]
    assert d.session.state is server.State.IDLE
    assert events(d, server.MailFrom) == []


@pytest.mark.parametrize("params, reply", [
    (b"NOTIFY=", BAD_NOTIFY),
    (b"NOTIFY", BAD_NOTIFY),
    (b"NOTIFY=NEVER,DELAY", BAD_NOTIFY),
    (b"NOTIFY=SUCCESS,", BAD_NOTIFY),
    (b"NOTIFY=SUCCESS,,DELAY", BAD_NOTIFY),
    (b"NOTIFY=WARN", BAD_NOTIFY),
    (b"NOTIFY=SUCCESS notify=DELAY", BAD_NOTIFY),
    (b"ORCPT=", BAD_ORCPT),
    (b"ORCPT", BAD_ORCPT),
    (b"ORCPT=x@y.test", BAD_ORCPT),
    (b"ORCPT=;x@y.test", BAD_ORCPT),
    (b"ORCPT=rfc822;x+2by.test", BAD_ORCPT),
    (b"ORCPT=rfc822;x=y.test", BAD_ORCPT),
    (b"ORCPT=rfc822;\xc3\xa9@y.test", BAD_ORCPT),
    (b"ORCPT=rfc822;" + b"x" * 494, BAD_ORCPT),
    (b"ORCPT=rfc822;a@y.test ORCPT=rfc822;a@y.test", BAD_ORCPT),
    (b"NOTIFY=BAD ORCPT=bad", BAD_NOTIFY),
    (b"ORCPT=bad NOTIFY=BAD", BAD_ORCPT),
    (b"RET=FULL", "555 5.5.4 Unsupported option: RET"),  # a MAIL parameter
    (b"NOTIFY=NEVER FOO", "555 5.5.4 Unsupported option: FOO"),
])
def test_bad_rcpt_dsn_parameters(smtp, params, reply):
    d = smtp()
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    assert d.send(b"RCPT TO:<x@y.test> " + params + b"\r\n") == [reply]
    assert d.session.state is server.State.MAIL
    assert events(d, server.RcptTo) == []


def test_a_refused_parameter_leaves_the_session_going(smtp):
    d = smtp()
    lines = d.send(b"MAIL FROM:<a@b.test> RET=NONE\r\nMAIL FROM:<a@b.test> RET=FULL\r\n"
                   b"RCPT TO:<x@y.test> NOTIFY=NONE\r\nRCPT TO:<x@y.test> NOTIFY=NEVER\r\n"
                   b"DATA\r\n")
    assert [line[:3] for line in lines] == ["501", "250", "501", "250", "354"]
