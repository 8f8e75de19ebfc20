"""8BITMIME to 7BIT conversion (engine.delivery.mime7bit) and its use by the SMTP client for
a next hop without 8BITMIME: smtp-sink -8, as Postfix's disable_mime_output_conversion = no."""

import quopri

import pytest
from test_delivery_smtp import run

from engine.config import Config
from engine.delivery import DeliveryRequest, NextHop
from engine.delivery.mime7bit import downgrade
from engine.delivery.smtp import deliver
from engine.dns import Resolver

SINGLE = (
    b"MIME-Version: 1.0\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9 = ok\r\n.dot\r\n"
)
MULTI = (
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary="b1"\r\n\r\n'
    b"preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n"
    b"--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nY2Fm\r\n"
    b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\nContent-Type: text/plain\r\n\r\nna\xc3\xafve\r\n"
    b"--b1--\r\nepilogue\r\n"
)


def test_single_part_becomes_quoted_printable():
    assert downgrade(SINGLE) == (
        b"MIME-Version: 1.0\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 =3D ok\r\n.dot\r\n"
    )


def test_multipart_converts_only_8bit_leaves_and_walks_message_parts():
    out = downgrade(MULTI)
    assert out.isascii()
    assert out == (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary="b1"\r\n\r\n'
        b"preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"
        b"--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nY2Fm\r\n"
        b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: inner\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nna=C3=AFve\r\n"
        b"--b1--\r\nepilogue\r\n"
    )


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: not MIME\r\n\r\ncaf\xc3\xa9\r\n",  # no MIME-Version: nothing to label it with
        b"MIME-Version: 1.0\r\nSubject: ascii\r\n\r\nplain\r\n",
        b"MIME-Version: 1.0\r\nSubject: caf\xc3\xa9",  # headers only
    ],
)
def test_left_as_it_is(content):
    assert downgrade(content) == content


def test_long_lines_are_soft_broken_and_decode_back():
    body = "é".encode() * 100 + b"\r\n"
    out = downgrade(b"MIME-Version: 1.0\r\n\r\n" + body)
    encoded = out.partition(b"\r\n\r\n")[2]
    assert max(len(line) for line in encoded.split(b"\r\n")) <= 76
    assert quopri.decodestring(encoded.replace(b"\r\n", b"\n")) == body.replace(b"\r\n", b"\n")


def request(port, content):
    return DeliveryRequest("4Xyz", "a@x.test", ["b@y.test"], content,
                           NextHop("smtp", "127.0.0.1", port, False), body_8bit=True)


@pytest.mark.parametrize("disabled", [False, True])
def test_8bit_message_to_a_server_without_8bitmime(smtp_sink, disabled):
    sink = smtp_sink("-8")
    config = Config(myhostname="client.tern.test", disable_mime_output_conversion=disabled)
    outcome = run(deliver(request(sink.port, SINGLE), config, Resolver(config)))
    assert outcome.results[0].status == "sent"
    (message,) = sink.messages()
    assert message.mail_args == "<a@x.test>"  # no BODY=8BITMIME to a server without it
    assert message.content == (SINGLE if disabled else downgrade(SINGLE))


def test_8bit_message_to_a_server_with_8bitmime_goes_as_it_is(smtp_sink):
    sink = smtp_sink()
    config = Config(myhostname="client.tern.test")
    run(deliver(request(sink.port, SINGLE), config, Resolver(config)))
    (message,) = sink.messages()
    assert message.mail_args == "<a@x.test> BODY=8BITMIME"
    assert message.content == SINGLE
