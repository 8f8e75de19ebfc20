"""bounce: composes delivery status notifications (RFC 3464 in an RFC 6522 multipart/report)
in the layout of Postfix's bounce(8): failure, delay and success notices.

Pure functions: bytes and dataclasses in, the notice's bytes out; no I/O, no clock (``now`` is
passed). Trusts the envelope and the config; the recipients' reasons, addresses and DSN
parameters come from clients and remote servers, so control characters in them are masked
before they reach a header. The caller queues the result with the null sender ``<>``, flagged
SMTPUTF8 when the original was (engine.qmgr.notices), as Postfix does.
"""

import re
import time
from dataclasses import dataclass

from engine.cleanup import rfc5322_date
from engine.config import Config
from engine.spool import Envelope, Recipient

__all__ = ["delay_notice", "failure_notice", "success_notice"]

SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})  # RFC 3464 §2.3.3


@dataclass(frozen=True)
class _Kind:
    """What differs between the three notices."""

    tag: str  # in the Message-Id
    subject: str
    default_status: str  # when the recipient has none (RFC 3463 class by outcome)
    description: str  # of the returned original: "Undelivered Message Headers" …
    text: tuple[str, ...]  # Postfix's boiler-plate, after "This is the mail system …"


_FAILURE = _Kind(
    "failure", "Undelivered Mail Returned to Sender", "5.0.0", "Undelivered ", (
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
    ))
_DELAY = _Kind(
    "delay", "Delayed Mail (still being retried)", "4.0.0", "Undelivered ", (
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "####################################################################",
        "",
        "Your message could not be delivered for more than {elapsed}.",
        "It will be retried until it is {lifetime} old.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
    ))
_SUCCESS = _Kind(
    "success", "Successful Mail Delivery Report", "2.0.0", "", (
        "Your message was successfully delivered to the destination(s)",
        "listed below. If the message was delivered to mailbox you will",
        "receive no further notifications. Otherwise you may still receive",
        "notifications of mail delivery errors from other systems.",
    ))
_SIGNATURE = "                   The mail system"

# RFC 3463 enhanced status code; anything else in Recipient.dsn is replaced by the default.
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# The smtp client's reason: "host mx[ip] said: 550 5.1.1 … (in reply to RCPT TO command)".
_SAID = re.compile(r"\bsaid: (\d{3}(?:[ -].*)?)$")
_SMTP_REPLY = re.compile(r"\d{3}(?:[ -].*)?")
_IN_REPLY_TO = re.compile(r"\s*\(in reply to [^()]* command\)$")
# Recipient.relay as the smtp client records it: "host[ip]:port" (IPv6 ip has colons).
_RELAY = re.compile(r"([^\[\]\s]*)\[([^\[\]\s]+)\](?::\d+)?")
_HOSTNAME = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\.?")
_XTEXT_HEX = re.compile(rb"\+([0-9A-F]{2})")  # RFC 3461 §4: xtext's "+" HEXCHAR HEXCHAR
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")  # controls, surrogate-escaped bytes
_ATEXT = r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]"  # RFC 5322 §3.2.3 (RFC 6532: UTF-8 too)
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# A header field line or a folded continuation (RFC 5322 §2.2), CRLF-terminated.
_HEADER_LINE = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t])[^\n]*\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_WRAP_WIDTH, _WRAP_INDENT = 79, 4  # Postfix's bounce_print_wrap
_FOLD_WIDTH = 78  # RFC 5322 §2.1.1


def failure_notice(envelope: Envelope, recipients: list[Recipient], content: bytes,
                   config: Config, now: float) -> bytes:
    """The non-delivery report for ``recipients`` (Action: failed). Returns the original as
    RET asks (RFC 3461 §4.3): headers for HDRS, else the whole message (Postfix's default) —
    but only the headers when it is larger than bounce_size_limit."""
    ret_full = envelope.ret.upper() != "HDRS"
    return _notice(_FAILURE, "failed", envelope, recipients, content, config, now, ret_full)


def delay_notice(envelope: Envelope, recipients: list[Recipient], content: bytes,
                 config: Config, now: float) -> bytes:
    """The delay warning for ``recipients`` (Action: delayed, Will-Retry-Until). Returns the
    original's headers only, as Postfix does."""
    return _notice(_DELAY, "delayed", envelope, recipients, content, config, now, False)


def success_notice(envelope: Envelope, recipients: list[Recipient], content: bytes,
                   config: Config, now: float, *, action: str = "relayed") -> bytes:
    """The NOTIFY=SUCCESS report (``action``: delivered, relayed or expanded, RFC 3464
    §2.3.3). Returns the original's headers only, as Postfix does."""
    if action not in SUCCESS_ACTIONS:
        raise ValueError(f"not a success action: {action!r}")
    return _notice(_SUCCESS, action, envelope, recipients, content, config, now, False)


def _notice(kind: _Kind, action: str, envelope: Envelope, recipients: list[Recipient],
            content: bytes, config: Config, now: float, ret_full: bool) -> bytes:
    """The whole message: top-level header, then RFC 6522's three parts."""
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    hostname = config.myhostname
    parts = [
        _text_part(kind, recipients, envelope, config, now),
        _status_part(action, kind, envelope, recipients, config, now),
        _original_part(kind, content, ret_full, config.bounce_size_limit, envelope.smtputf8),
    ]
    boundary = _boundary(f"{envelope.queue_id}.{int(now)}/{hostname}", parts)
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    head = [f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)"]
    if envelope.sender:
        head.append(f"To: {_mailbox(_clean(envelope.sender))}")
    head += [
        f"Subject: {kind.subject}",
        f"Date: {rfc5322_date(now)}",
        f"Message-Id: <{stamp}.{envelope.queue_id}-{kind.tag}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if any(not part.isascii() for part in parts):
        head.append("Content-Transfer-Encoding: 8bit")  # RFC 2045 §6.4: as its 8bit parts
    delimiter = f"\r\n--{boundary}\r\n".encode()
    return b"".join([
        _lines(head), b"\r\nThis is a MIME-encapsulated message.\r\n",
        delimiter, delimiter.join(parts), f"\r\n--{boundary}--\r\n".encode(),
    ])


def _text_part(kind: _Kind, recipients: list[Recipient], envelope: Envelope, config: Config,
               now: float) -> bytes:
    """Part 1: Postfix's boiler-plate, then ``<address>: reason`` for each recipient, wrapped
    at 79 columns with a 4-space indent as Postfix wraps them."""
    values = {"elapsed": _span(now - envelope.arrival),
              "lifetime": _span(config.maximal_queue_lifetime)}
    lines = [f"This is the mail system at host {config.myhostname}.", ""]
    lines += [line.format(**values) for line in kind.text]
    lines += ["", _SIGNATURE]
    for recipient in recipients:
        lines.append("")
        lines += _wrap(f"<{_clean(recipient.address)}>: {_reason(kind, recipient)}")
    text = _lines(lines)
    charset = "us-ascii" if text.isascii() else "utf-8"
    return _part(["Content-Description: Notification",
                  f"Content-Type: text/plain; charset={charset}"], text)


def _status_part(action: str, kind: _Kind, envelope: Envelope, recipients: list[Recipient],
                 config: Config, now: float) -> bytes:
    """Part 2: message/delivery-status, the per-message fields then one block per recipient
    (RFC 3464 §2.2, §2.3), in the ABNF's order, extension fields last. For a message sent
    with SMTPUTF8, message/global-delivery-status with "utf-8" addresses (RFC 6533 §3, as
    Postfix's bounce(8) does only then)."""
    utf8 = envelope.smtputf8
    fields = []
    if envelope.envid:
        fields.append(f"Original-Envelope-Id: {_clean(_xtext_decode(envelope.envid))}")
    fields.append(f"Reporting-MTA: dns; {config.myhostname}")
    fields.append(f"Arrival-Date: {rfc5322_date(envelope.arrival)}")
    fields.append(f"X-Tern-Queue-ID: {envelope.queue_id}")
    if envelope.sender:
        fields.append(f"X-Tern-Sender: {_address_type(envelope.sender, utf8)}; "
                      f"{_clean(envelope.sender)}")
    retry_until = envelope.arrival + config.maximal_queue_lifetime
    for recipient in recipients:
        fields.append("")
        fields += _recipient_fields(recipient, action, kind, now,
                                    retry_until if kind is _DELAY else None, utf8)
    content_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    return _part(["Content-Description: Delivery report", f"Content-Type: {content_type}"],
                 _lines(_fold(f) for f in fields))


def _address_type(address: str, utf8: bool) -> str:
    """RFC 6533 §3: "utf-8" for a non-ASCII address of a message sent with SMTPUTF8, else
    "rfc822" (Postfix's IS_UTF8_ADDRESS test)."""
    return "utf-8" if utf8 and not address.isascii() else "rfc822"


def _recipient_fields(recipient: Recipient, action: str, kind: _Kind, now: float,
                      retry_until: float | None, utf8: bool = False) -> list[str]:
    """One recipient's block (RFC 3464 §2.3)."""
    fields = []
    if recipient.orcpt:
        fields.append(f"Original-Recipient: {_original_recipient(recipient.orcpt)}")
    status = recipient.dsn if _STATUS.fullmatch(recipient.dsn) else kind.default_status
    fields += [
        f"Final-Recipient: {_address_type(recipient.address, utf8)}; "
        f"{_clean(recipient.address)}",
        f"Action: {action}",
        f"Status: {status}",
    ]
    remote = _remote_mta(recipient.relay)
    if remote:
        fields.append(f"Remote-MTA: dns; {remote}")
    diagnostic = _diagnostic_code(_clean(recipient.last_reply))
    if diagnostic:
        fields.append(f"Diagnostic-Code: {diagnostic}")
    if recipient.attempts:
        # The spool keeps no time per attempt; the notice is made right after the attempt
        # that caused it, so its time stands for the last attempt's.
        fields.append(f"Last-Attempt-Date: {rfc5322_date(now)}")
    if retry_until is not None:
        fields.append(f"Will-Retry-Until: {rfc5322_date(retry_until)}")
    return fields


def _original_part(kind: _Kind, content: bytes, ret_full: bool, size_limit: int,
                   utf8: bool = False) -> bytes:
    """Part 3: the returned original. When it is larger than bounce_size_limit, Postfix does
    not cut it (which could break its MIME structure) but returns its headers only, as
    text/rfc822-headers; so does Tern. The header section is then still cut, at a field
    boundary, to at most bounce_size_limit bytes, so a notice is always bounded. A message
    sent with SMTPUTF8 comes back as message/global or message/global-headers (RFC 6532
    §3.7, RFC 6533 §3), as Postfix returns it."""
    content = _BARE_LF.sub(b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    if ret_full and not (size_limit and len(content) > size_limit):
        head = [f"Content-Description: {kind.description}Message",
                f"Content-Type: {'message/global' if utf8 else 'message/rfc822'}"]
        body = content
    else:
        head = [f"Content-Description: {kind.description}Message Headers",
                f"Content-Type: {'message/global-headers' if utf8 else 'text/rfc822-headers'}"]
        body = _header_section(content, size_limit)
    return _part(head, body)


def _header_section(content: bytes, size_limit: int) -> bytes:
    """The header fields at the start of ``content``, whole fields only, at most
    ``size_limit`` bytes of them (0 = no limit)."""
    kept = pos = 0
    while (line := _HEADER_LINE.match(content, pos)) is not None:
        if content[pos] not in b" \t" and (not size_limit or pos <= size_limit):
            kept = pos  # a field starts here: everything before it is whole fields
        pos = line.end()
    if not size_limit or pos <= size_limit:
        kept = pos
    return content[:kept]


def _part(head: list[str], body: bytes) -> bytes:
    """One body part: its MIME header, a blank line, the body (CRLF-terminated). 8-bit
    bodies say so (RFC 2045 §6.2; message/rfc822 allows 7bit, 8bit or binary, RFC 2046
    §5.2.1)."""
    if not body.isascii():
        head = [*head, "Content-Transfer-Encoding: 8bit"]
    return _lines(head) + b"\r\n" + body


def _lines(lines) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


def _boundary(base: str, parts: list[bytes]) -> str:
    """Postfix's boundary, "queueid.time/myhostname", cut to 70 characters (RFC 2046 §5.1.1);
    should a part contain it, a counter is appended until none does."""
    boundary, counter = base[:70], 0
    while any(f"--{boundary}".encode() in part for part in parts):
        counter += 1
        boundary = f"{base[:60]}={counter}"
    return boundary


def _remote_mta(relay: str) -> str:
    """"mx.example.net[192.0.2.1]:25" → "mx.example.net"; "none", "local", paths → ""."""
    found = _RELAY.fullmatch(relay)
    if found:
        return found.group(1) if found.group(1) not in ("", "unknown") else f"[{found.group(2)}]"
    host = relay.rsplit(":", 1)[0] if relay.count(":") == 1 else relay
    return host if _HOSTNAME.fullmatch(host) else ""


def _diagnostic_code(reason: str) -> str:
    """An SMTP reply as "smtp; 550 5.1.1 …" (without Postfix's "(in reply to … command)");
    any other reason as Postfix reports it, "X-Tern; reason" (RFC 3464 §2.3.6)."""
    if not reason:
        return ""
    said = _SAID.search(reason)
    if said:
        return f"smtp; {_IN_REPLY_TO.sub('', said.group(1))}"
    if _SMTP_REPLY.fullmatch(reason):
        return f"smtp; {_IN_REPLY_TO.sub('', reason)}"
    return f"X-Tern; {reason}"


def _original_recipient(orcpt: str) -> str:
    """ORCPT as stored ("rfc822;user+2Bx@example.org", RFC 3461 §4.2) → "rfc822; user+x@…":
    the xtext decoded (RFC 3461 §6.3 d), as Postfix's smtpd decodes it before the bounce."""
    addr_type, semicolon, address = orcpt.partition(";")
    if not semicolon:
        addr_type, address = "rfc822", orcpt
    return f"{_clean(addr_type.strip())}; {_clean(_xtext_decode(address.strip()))}"


def _xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext: "+" and two upper-case hex digits stand for one byte."""
    if "+" not in value:
        return value
    raw = _XTEXT_HEX.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode())
    return raw.decode("utf-8", "replace")


def _clean(text: str) -> str:
    """Masks what must not reach a header or a line: control characters, CR and LF, and
    undecodable bytes (as Postfix masks them in bounce logs)."""
    return _UNSAFE.sub("?", text)


def _mailbox(address: str) -> str:
    """An address for a header: the local part quoted when it is not a dot-atom (Postfix's
    quote_822_local)."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if _DOT_ATOM.fullmatch(local) or (len(local) > 1 and local[0] == local[-1] == '"'):
        return address
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{quoted}@{domain}" if at else quoted


def _reason(kind: _Kind, recipient: Recipient) -> str:
    """The human text's reason: the recorded one; on success, Postfix's "delivery via
    host[ip]:port: 250 …" when a server took it."""
    reason = _clean(recipient.last_reply)
    if kind is _SUCCESS and _remote_mta(recipient.relay) and _SMTP_REPLY.fullmatch(reason):
        return f"delivery via {_clean(recipient.relay)}: {reason}"
    return reason or {"failure": "delivery failed", "delay": "delivery temporarily deferred",
                      "success": "delivery succeeded"}[kind.tag]


def _span(seconds: float) -> str:
    """Whole days, else hours, else minutes, in Postfix's "5 day(s)" words."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}(s)"
    return f"{int(max(seconds, 0) // 60)} minute(s)"


def _wrap(text: str) -> list[str]:
    """Postfix's line_wrap: lines of at most 79 columns where spaces allow, continuation
    lines indented by 4."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        indent = _WRAP_INDENT if lines else 0
        if current and indent + len(current) + 1 + len(word) > _WRAP_WIDTH:
            lines.append(" " * indent + current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(" " * (_WRAP_INDENT if lines else 0) + current)
    return lines


def _fold(field: str) -> str:
    """RFC 5322 §2.2.3 folding at spaces, so that unfolding gives ``field`` back exactly:
    each CRLF goes before an existing space. A long run without spaces stays whole."""
    pieces = []
    while len(field) > _FOLD_WIDTH:
        cut = field.rfind(" ", 1, _FOLD_WIDTH)
        if cut <= 0 or not field[:cut].strip():
            cut = field.find(" ", _FOLD_WIDTH)
        if cut <= 0 or not field[:cut].strip() or not field[cut:].strip():
            break
        pieces.append(field[:cut])
        field = field[cut:]
    pieces.append(field)
    return "\r\n".join(pieces)
