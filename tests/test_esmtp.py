"""ESMTP extensions of the server core, fed as bytes (both reader twins): what EHLO offers,
SMTPUTF8 (RFC 6531), SIZE and 8BITMIME, enhanced status codes (RFC 2034 / 3463) on every reply;
the UTF-8 mailbox grammar in both grammar twins; the spool's smtputf8 flag."""

import inspect
import json
import re

import pytest
from test_smtp_server import Driver, codes

from engine.smtp import replies, server
from engine.smtp.grammar import GrammarError
from engine.smtp.replies import Reply
from engine.spool import Envelope, Recipient

NOT_DECLARED = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
BAD_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax"


@pytest.fixture
def smtp(impl):
    reader_class = impl("reader").Reader
    return lambda **kwargs: Driver(reader_class, **kwargs)


def events(driver, kind):
    return [event for event in driver.events if isinstance(event, kind)]


# -- EHLO ----------------------------------------------------------------------------------------

def test_ehlo_offers_every_extension_with_the_size_limit(smtp):
    lines = smtp(message_size_limit=10240000).send(b"EHLO client.test\r\n")
    keywords = [line[4:] for line in lines[1:]]
    assert {"PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8",
            "CHUNKING"} <= set(keywords)
    assert lines[-1].startswith("250 ") and all(line.startswith("250-") for line in lines[:-1])


def test_ehlo_offers_bare_size_when_unlimited(smtp):
    keywords = [line[4:] for line in smtp(message_size_limit=0).send(b"EHLO c.test\r\n")]
    assert "SIZE" in keywords and not any(k.startswith("SIZE ") for k in keywords)


def test_helo_offers_no_extensions(smtp):
    assert smtp().send(b"HELO client.test\r\n") == ["250 mx.example.test"]


# -- SMTPUTF8 ------------------------------------------------------------------------------------

def test_utf8_sender_and_recipients_with_smtputf8(smtp):
    d = smtp()
    lines = d.send("EHLO c.test\r\nMAIL FROM:<jörg@bücher.test> SMTPUTF8 BODY=8BITMIME\r\n"
                   "RCPT TO:<用户@例子.广告>\r\nRCPT TO:<\"ä b\"@y.test>\r\n"
                   "RCPT TO:<ascii@y.test>\r\n".encode())
    assert codes(lines)[-4:] == ["250", "250", "250", "250"]
    (mail,) = events(d, server.MailFrom)
    assert mail.sender == "jörg@bücher.test"
    assert mail.params == {"SMTPUTF8": None, "BODY": "8BITMIME"}
    assert [r.recipient for r in events(d, server.RcptTo)] == [
        "用户@例子.广告", '"ä b"@y.test', "ascii@y.test"]


def test_smtputf8_keyword_is_case_insensitive(smtp):
    d = smtp()
    assert d.send("MAIL FROM:<é@b.test> smtputf8\r\n".encode()) == ["250 2.1.0 Ok"]
    assert events(d, server.MailFrom)[0].params == {"SMTPUTF8": None}


@pytest.mark.parametrize("mail, rcpt, reply", [
    ("MAIL FROM:<é@b.test>", None, NOT_DECLARED),
    ("MAIL FROM:<a@bücher.test> SIZE=10", None, NOT_DECLARED),
    ("MAIL FROM:<a@b.test>", "RCPT TO:<é@y.test>", NOT_DECLARED),
    ("MAIL FROM:<a@b.test>", "RCPT TO:<x@例子.广告> NOTIFY=NEVER", NOT_DECLARED),
    ("MAIL FROM:<a@b.test> SMTPUTF8=yes", None, "555 5.5.4 Unsupported option: SMTPUTF8=yes"),
    ("MAIL FROM:<a@b.test> SMTPUTF8", "RCPT TO:<x@y.test> SMTPUTF8",
     "555 5.5.4 Unsupported option: SMTPUTF8"),
    ("MAIL FROM:<é b@x.test> SMTPUTF8", None, "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<a@b.test> SMTPUTF8", "RCPT TO:<x@-例子.test>",
     "501 5.1.3 Bad recipient address syntax"),
])
def test_unicode_addresses_need_smtputf8_and_good_syntax(smtp, mail, rcpt, reply):
    d = smtp()
    first = d.send(mail.encode() + b"\r\n")
    if rcpt is None:
        assert first == [reply]
        assert d.session.state is server.State.IDLE
    else:
        assert first == ["250 2.1.0 Ok"]
        assert d.send(rcpt.encode() + b"\r\n") == [reply]


def test_smtputf8_holds_for_one_transaction_only(smtp):
    d = smtp()
    lines = d.send("MAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<é@y.test>\r\nRSET\r\n"
                   "MAIL FROM:<a@b.test>\r\nRCPT TO:<é@y.test>\r\n".encode())
    assert lines == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok",
                     NOT_DECLARED]


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<\xff@b.test> SMTPUTF8",  # not UTF-8 at all
    b"MAIL FROM:<\xc3@b.test> SMTPUTF8",  # truncated sequence
    b"MAIL FROM:<\xc0\xaf@b.test> SMTPUTF8",  # overlong "/"
    b"MAIL FROM:<\xed\xa0\x80@b.test> SMTPUTF8",  # an encoded surrogate
    b"EHLO \xfe\xff",
    b"\xff\xfe",
    b"NOOP \xf8\x88\x80\x80\x80",
])
def test_invalid_utf8_is_a_syntax_error_and_the_session_goes_on(smtp, line):
    d = smtp()
    assert d.send(line + b"\r\nNOOP\r\n") == [BAD_UTF8, "250 2.0.0 Ok"]
    assert events(d, server.MailFrom) == events(d, server.Helo) == []


@pytest.mark.parametrize("line, reply", [
    ("EHLO bücher.test", None),
    ("HELO bücher.test", "250 mx.example.test"),
    ("VRFY jörg", "252"),
    ("MAİL FROM:<a@b.test>", "502 5.5.2 Error: command not recognized"),
    ("NOOP ☃", "250 2.0.0 Ok"),
    ("RSET ☃", "501 5.5.4 Syntax: command takes no arguments"),
    ("BDAT ٣", "521 5.5.4 Syntax: BDAT count [LAST]"),  # an Arabic-Indic digit is no DIGIT
])
def test_utf8_in_any_command_is_handled(smtp, line, reply):
    d = smtp()
    lines = d.send(line.encode() + b"\r\n")
    if reply is None:
        assert lines[0] == "250-mx.example.test" and lines[-1] == "250 CHUNKING"
        assert events(d, server.Helo)[0].name == "bücher.test"
    else:
        assert lines[-1].startswith(reply)


# -- SIZE and 8BITMIME ---------------------------------------------------------------------------

@pytest.mark.parametrize("param, reply", [
    ("SIZE=5000", "250 2.1.0 Ok"),
    ("SIZE=5001", "552 5.3.4 Message size exceeds fixed limit"),
    ("SIZE=", "501 5.5.4 Bad SIZE keyword value"),
    ("SIZE", "501 5.5.4 Bad SIZE keyword value"),
    ("SIZE=-1", "501 5.5.4 Bad SIZE keyword value"),
    ("SIZE=٣", "501 5.5.4 Bad SIZE keyword value"),  # a DIGIT is ASCII (str.isdigit is not)
    ("BODY=8BITMIME", "250 2.1.0 Ok"),
    ("body=7bit", "250 2.1.0 Ok"),
    ("BODY=BINARYMIME", "501 5.5.4 Bad BODY keyword value"),  # no BINARYMIME offered
    ("BODY", "501 5.5.4 Bad BODY keyword value"),
])
def test_size_and_body_parameters(smtp, param, reply):
    assert smtp(message_size_limit=5000).send(
        f"MAIL FROM:<a@b.test> {param}\r\n".encode()) == [reply]


def test_declared_size_is_unchecked_without_a_limit(smtp):
    assert smtp(message_size_limit=0).send(b"MAIL FROM:<a@b.test> SIZE=999999999999\r\n") == [
        "250 2.1.0 Ok"]


# -- ENHANCEDSTATUSCODES -------------------------------------------------------------------------

ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3}) ")


def has_enhanced_code(code: int, text: str) -> bool:
    """RFC 3463 §2: class.subject.detail leads the text, its class that of the reply code."""
    found = ENHANCED.match(text)
    return found is not None and found[1] == str(code)[0]


def every_fixed_reply():
    """Each module-level Reply of engine.smtp.replies, and each reply function's result."""
    for name, value in vars(replies).items():
        if isinstance(value, Reply):
            yield name, value
        elif inspect.isfunction(value) and value.__module__ == replies.__name__:
            parameters = inspect.signature(value).parameters.values()
            samples = [1234 if p.annotation in (int, "int") else "X1"
                       for p in parameters if p.default is inspect.Parameter.empty]
            yield name, value(*samples)
            if "chunked_size" in inspect.signature(value).parameters:
                yield name, value(*samples, chunked_size=99)


#: Replies RFC 2034 §3 leaves without an enhanced code: the greeting, EHLO/HELO's, and 354.
NO_ENHANCED_CODE = {"START_DATA"}


def test_every_fixed_reply_has_an_enhanced_status_code_of_its_class():
    checked = 0
    for name, reply in every_fixed_reply():
        if name in NO_ENHANCED_CODE:
            assert reply.code == 354
            continue
        assert reply.code // 100 in (2, 4, 5), name
        for line in reply.lines:
            assert has_enhanced_code(reply.code, line), (name, str(reply))
        checked += 1
    assert checked >= 40  # the walk found the table (a rename cannot make it vacuous)


def test_every_reply_of_a_whole_session_has_an_enhanced_status_code(smtp):
    refuse = {"y@bad.test": Reply(554, "5.7.1 <y@bad.test>: Relay access denied")}
    d = smtp(message_size_limit=20, recipient_limit=2,
             refuse=lambda e: refuse.get(getattr(e, "recipient", None)))
    stream = ("XYZZY\r\n\r\nRCPT TO:<x@y.test>\r\nDATA\r\nBDAT 1\r\nxBDAT 0\r\nRSET\r\n"
              "EHLO c.test\r\nHELP\r\nVRFY a\r\nVRFY\r\nNOOP\r\nRSET x\r\n"
              "MAIL FROM:<a@b.test> SIZE=99\r\nMAIL FROM:<a b>\r\nMAIL FROM:<é@b.test>\r\n"
              "MAIL FROM:<a@b.test> RET=X\r\nMAIL FROM:<a@b.test> FOO\r\nMAIL FROM:<a@b.test>\r\n"
              "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test> NOTIFY=X\r\nRCPT TO:<y@bad.test>\r\n"
              "RCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nRCPT TO:<w@y.test>\r\nDATA x\r\n"
              "BDAT 5\r\n12345BDAT 20\r\n" + "x" * 20 + "BDAT 1 LAST\r\nx"
              "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nBDAT 3\r\nabcDATA\r\n"
              "BDAT 0 LAST\r\n\xff\r\nBDAT x\r\n")
    lines = d.send(stream.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf\r", b"\xff\r"))
    assert d.session.closed  # the malformed BDAT at the end hung up
    assert len(lines) > 35
    for line in lines:
        code, text = int(line[:3]), line[4:]
        if line.startswith("250-") or line in ("250 CHUNKING",):
            continue  # the EHLO reply
        assert has_enhanced_code(code, text), line


# -- the grammar (both twins) --------------------------------------------------------------------

@pytest.fixture
def grammar(impl):
    return impl("grammar")


@pytest.mark.parametrize("address", [
    "jörg@bücher.test", "用户@例子.广告", "δοκιμή@παράδειγμα.δοκιμή", '"ä b"@y.test',
    "x@[127.0.0.1]".replace("x", "ü"), "a.ü.b@c-d.test",
])
def test_utf8_mailboxes_are_well_formed(grammar, address):
    assert grammar.check_mailbox(address, replies.BAD_SENDER) == address
    assert grammar.parse_mail_from(f"FROM:<{address}> SMTPUTF8") == (address,
                                                                      [("SMTPUTF8", None)])


@pytest.mark.parametrize("address", [
    "\udcc3\udca9@b.test",  # undecodable bytes (surrogateescape) are not UTF8-non-ascii
    "ü..b@c.test", "ü@-c.test", "ü@c-.test", "ü b@c.test", '"ä\\é"@y.test', "ü@", "@ü",
])
def test_malformed_utf8_mailboxes_are_refused(grammar, address):
    with pytest.raises(GrammarError) as raised:
        grammar.check_mailbox(address, replies.BAD_SENDER)
    assert raised.value.reply == replies.BAD_SENDER


# -- the spool -----------------------------------------------------------------------------------

def envelope(**fields):
    return Envelope(queue_id="4Xyz", sender="jörg@bücher.test",
                    recipients=[Recipient(address="用户@例子.广告")], arrival=1.0, size=10,
                    **fields)


def test_envelope_keeps_the_smtputf8_flag():
    decoded = Envelope.decode(envelope(smtputf8=True).encode())
    assert decoded.smtputf8 is True
    assert decoded.sender == "jörg@bücher.test"
    assert decoded.recipients[0].address == "用户@例子.广告"
    assert Envelope.decode(envelope().encode()).smtputf8 is False


def test_envelope_stored_before_the_flag_decodes_as_not_smtputf8():
    old = json.loads(envelope().encode())
    del old["smtputf8"]
    decoded = Envelope.decode(json.dumps(old).encode())
    assert decoded.smtputf8 is False and decoded == envelope()


# -- RFC 6533: a UTF-8 original recipient --------------------------------------------------------

@pytest.mark.parametrize("value, kept", [
    ("utf-8;jörg@bücher.test", True),
    ("UTF-8;用户@例子.广告", True),
    ("utf-8;a\\x{E9}b@c.test", True),  # EmbeddedUnicodeChar: ASCII, so xtext too
    ("rfc822;jörg@bücher.test", False),  # only the utf-8 type carries UTF-8
    ("utf-8;jö rg@x.test", False),
    ("utf-8;jö+rg@x.test", False),  # "+" is no QCHAR
    ("utf-8;jö=rg@x.test", False),
    ("utf-8;\udcc3@x.test", False),
])
def test_orcpt_of_utf8_type(value, kept):
    from engine.smtp import grammar
    assert grammar.dsn_orcpt(value) == (value if kept else None)


def test_utf8_orcpt_needs_smtputf8(smtp):
    d = smtp()
    lines = d.send("MAIL FROM:<a@b.test> SMTPUTF8\r\n"
                   "RCPT TO:<x@y.test> ORCPT=utf-8;jörg@bücher.test\r\nRSET\r\n"
                   "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test> ORCPT=utf-8;jörg@bücher.test\r\n"
                   "RCPT TO:<x@y.test> ORCPT=utf-8;j\\x{F6}rg@b\\x{FC}cher.test\r\n".encode())
    assert lines == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok",
                     NOT_DECLARED, "250 2.1.5 Ok"]
    assert [r.params["ORCPT"] for r in events(d, server.RcptTo)] == [
        "utf-8;jörg@bücher.test", "utf-8;j\\x{F6}rg@b\\x{FC}cher.test"]
