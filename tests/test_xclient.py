"""XCLIENT and XFORWARD in the sans-I/O core: advertised only to authorized clients, Postfix's
replies and checking order, attribute decoding, and XCLIENT's restart with a new greeting."""

import pytest

from engine.smtp import server
from engine.smtp.xclient import parse_attributes

XCLIENT_LINE = "250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
XFORWARD_LINE = "250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"


class Session:
    """A ServerSession whose every request is accepted; the requests are kept."""

    def __init__(self, *, xclient=False, xforward=False):
        settings = server.Settings(hostname="mx.test", banner="mx.test ESMTP Tern")
        self.core = server.ServerSession(settings)
        self.core.xclient_allowed, self.core.xforward_allowed = xclient, xforward
        self.core.data_to_send()  # the greeting
        self.requests = []

    def send(self, data: bytes) -> list[str]:
        self.core.receive_data(data)
        while (event := self.core.next_event()) is not None:
            if self.core.awaiting_answer:
                self.requests.append(event)
                self.core.accept()
        return [line for line in self.core.data_to_send().decode().split("\r\n") if line]


def test_ehlo_advertises_the_verbs_only_to_authorized_clients():
    assert not {XCLIENT_LINE, XFORWARD_LINE} & set(Session().send(b"EHLO c.test\r\n"))
    both = Session(xclient=True, xforward=True).send(b"EHLO c.test\r\n")
    assert both.index(XCLIENT_LINE) + 1 == both.index(XFORWARD_LINE)
    assert XFORWARD_LINE in Session(xforward=True).send(b"EHLO c.test\r\n")
    assert XCLIENT_LINE not in Session(xforward=True).send(b"EHLO c.test\r\n")
    assert not any("XCLIENT" in line for line in Session(xclient=True).send(b"HELO c.test\r\n"))


def test_unauthorized_client_gets_550_and_no_event():
    session = Session()
    assert session.send(b"XCLIENT ADDR=192.0.2.7\r\nXFORWARD ADDR=192.0.2.7\r\n") == [
        "550 5.7.0 Error: insufficient authorization"] * 2
    assert session.requests == []


def test_checks_come_in_postfix_order():
    """Empty → 501 even unauthorized; in a transaction → 503 even unauthorized; then 550."""
    session = Session()
    assert session.send(b"XCLIENT\r\nXFORWARD\r\n") == [
        "501 5.5.4 Syntax: XCLIENT attribute=value...",
        "501 5.5.4 Syntax: XFORWARD attribute=value..."]
    session.send(b"MAIL FROM:<a@example.org>\r\n")
    assert session.send(b"XCLIENT NAME=x.test\r\nXFORWARD NAME=x.test\r\n") == [
        "503 5.5.1 Error: MAIL transaction in progress"] * 2
    session.send(b"RSET\r\n")
    assert session.send(b"XCLIENT FOO=bar\r\n") == ["550 5.7.0 Error: insufficient authorization"]


def test_xclient_replaces_identity_and_greets_again():
    session = Session(xclient=True)
    session.send(b"EHLO proxy.test\r\n")
    replies = session.send(b"XCLIENT NAME=mail.example.org ADDR=192.0.2.7 PORT=40000 "
                           b"LOGIN=alice+40example.org\r\n")
    assert replies == ["220 mx.test ESMTP Tern"]
    (request,) = session.requests[1:]
    assert request == server.Xclient({"NAME": "mail.example.org", "ADDR": "192.0.2.7",
                                      "PORT": "40000", "LOGIN": "alice@example.org"})
    # back at the greeting stage: EHLO is needed again for the extensions, HELO is forgotten
    assert session.core.helo_name is None and not session.core.extended
    assert session.send(b"EHLO mail.example.org\r\n")[0] == "250-mx.test"


def test_xclient_helo_and_proto_survive_the_restart():
    session = Session(xclient=True)
    session.send(b"EHLO proxy.test\r\nXCLIENT HELO=client.example PROTO=esmtp\r\n")
    assert (session.core.helo_name, session.core.extended) == ("client.example", True)


def test_xclient_is_logged_in_only_with_login():
    """The proxy's own AUTH never passes to the client XCLIENT names (RFC 4954 state)."""
    session = Session(xclient=True)
    session.core.authenticated = True  # the proxy said AUTH
    session.send(b"XCLIENT ADDR=192.0.2.66\r\n")
    assert not session.core.authenticated
    session.send(b"XCLIENT LOGIN=alice\r\n")
    assert session.core.authenticated
    session.send(b"XCLIENT LOGIN=[UNAVAILABLE]\r\n")
    assert not session.core.authenticated


def test_xforward_answers_250_and_keeps_the_state():
    session = Session(xforward=True)
    replies = session.send(b"EHLO filter.test\r\nXFORWARD NAME=mail.example.org "
                           b"ADDR=IPv6:2001:DB8::7 PROTO=ESMTP\r\nXFORWARD HELO=[UNAVAILABLE] "
                           b"IDENT=4Bx9Yz SOURCE=remote\r\nMAIL FROM:<a@example.org>\r\n")
    assert replies[-3:] == ["250 2.0.0 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok"]
    assert session.requests[1:3] == [
        server.Xforward({"NAME": "mail.example.org", "ADDR": "2001:db8::7", "PROTO": "ESMTP"}),
        server.Xforward({"HELO": None, "IDENT": "4Bx9Yz", "SOURCE": "REMOTE"})]
    assert session.core.helo_name == "filter.test"


@pytest.mark.parametrize("verb, arg, reply", [
    ("XCLIENT", "ADDR", "501 5.5.4 Error: attribute=value expected"),
    ("XCLIENT", "FOO=bar", "501 5.5.4 Bad XCLIENT attribute name: FOO"),
    ("XFORWARD", "LOGIN=bob", "501 5.5.4 Bad XFORWARD attribute name: LOGIN"),
    ("XCLIENT", "SOURCE=LOCAL", "501 5.5.4 Bad XCLIENT attribute name: SOURCE"),
    ("XCLIENT", "ADDR=notanaddr", "501 5.5.4 Bad ADDR syntax: notanaddr"),
    ("XCLIENT", "ADDR=2001:db8::1", "501 5.5.4 Bad ADDR syntax: 2001:db8::1"),  # IPv6: needed
    ("XCLIENT", "ADDR=IPv6:192.0.2.1", "501 5.5.4 Bad ADDR syntax: IPv6:192.0.2.1"),
    ("XFORWARD", "ADDR=zz", "501 5.5.4 Bad ADDR syntax: zz"),
    ("XCLIENT", "NAME=a+2Bb", "501 5.5.4 Bad NAME syntax: a+b"),
    ("XCLIENT", "NAME=", "501 5.5.4 Bad NAME syntax: "),
    ("XCLIENT", "PORT=abc", "501 5.5.4 Bad PORT syntax: abc"),
    ("XCLIENT", "PORT=65536", "501 5.5.4 Bad PORT syntax: 65536"),
    ("XCLIENT", "PROTO=LMTP", "501 5.5.4 Bad PROTO syntax: LMTP"),
    ("XFORWARD", "SOURCE=SOMEWHERE", "501 5.5.4 Bad SOURCE syntax: SOMEWHERE"),
    ("XCLIENT", "HELO=a=b", "501 5.5.4 Bad HELO syntax: a=b"),  # "=" is not xtext
    ("XFORWARD", "HELO=a+0D+0AX", "501 5.5.4 Bad HELO syntax: a??X"),  # no CR LF in replies
    ("XFORWARD", "NAME=x(y)", "501 5.5.4 Bad NAME syntax: x(y)"),
    ("XFORWARD", "IDENT=" + "x" * 256, "501 5.5.4 Error: attribute value too long"),
])
def test_bad_attributes_get_postfix_501(verb, arg, reply):
    session = Session(xclient=True, xforward=True)
    assert session.send(f"{verb} {arg}\r\n".encode()) == [reply]
    assert session.requests == []


def test_unavailable_values_in_any_case():
    assert parse_attributes("XCLIENT", "NAME=[TEMPUNAVAIL] ADDR=[unavailable] HELO=[Unavailable]"
                            ) == {"NAME": None, "ADDR": None, "HELO": None}


def test_attribute_names_ignore_case_and_values_are_normalised():
    assert parse_attributes("XCLIENT", "name=MAIL.Example.ORG addr=IPV6:::ffff:192.0.2.1 "
                            "destaddr=198.51.100.1 destport=25 reverse_name=r.example") == {
        "NAME": "mail.example.org", "ADDR": "192.0.2.1", "DESTADDR": "198.51.100.1",
        "DESTPORT": "25", "REVERSE_NAME": "r.example"}


def test_forwarded_names_cannot_make_log_fields_of_their_own():
    """";", "@", "," and "=" become "?" (as Postfix neuters, rather than refusing what an
    up-stream MTA accepted): an IDENT cannot add an ``, orig_client=…`` to the client= line."""
    assert parse_attributes("XFORWARD", "IDENT=Q1,orig_client+3Devil.example "
                            "NAME=a;b HELO=c@d.example PROTO=X+3DY") == {
        "IDENT": "Q1?orig_client?evil.example", "NAME": "a?b", "HELO": "c?d.example",
        "PROTO": "X?Y"}
    assert parse_attributes("XCLIENT", "HELO=x;y LOGIN=alice@example.org") == {
        "HELO": "x?y", "LOGIN": "alice@example.org"}


def test_xclient_in_a_pipelined_batch_answers_in_order():
    session = Session(xclient=True)
    replies = session.send(b"EHLO p.test\r\nXCLIENT ADDR=192.0.2.7\r\nEHLO c.test\r\n"
                           b"MAIL FROM:<a@example.org>\r\n")
    finals = [line for line in replies if line[3] == " "]
    assert [line[:3] for line in finals] == ["250", "220", "250", "250"]
    assert session.core.command_counts == {"ehlo": 2, "xclient": 1, "mail": 1}


def test_between_bdat_chunks_is_inside_the_transaction():
    session = Session(xclient=True, xforward=True)
    session.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                 b"BDAT 5\r\nhello")
    assert session.send(b"XCLIENT ADDR=192.0.2.7\r\nXFORWARD ADDR=192.0.2.7\r\n") == [
        "503 5.5.1 Error: MAIL transaction in progress"] * 2
