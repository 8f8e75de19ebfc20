"""``tern queue show QID``: one queued message, as Postfix's ``postcat -q`` shows it.

The envelope (sender, arrival, each recipient with its status and the reason of its last
attempt), then the headers and the body, or the same as one JSON object. Reads the spool
read-only, so it works while the server runs (which it asks whether the message is active).
Trusts the spool's contents as written by Tern.
"""

import json
import time
from typing import TextIO

from engine.cli.queue import (
    NoSuchMessage,
    active_ids,
    json_record,
    open_shard,
    queue_name,
    shard_paths,
)
from engine.config import Config
from engine.spool import Envelope, Recipient

SECTIONS = ("envelope", "headers", "body")


def find_message(config: Config, queue_id: str) -> tuple[Envelope, bytes]:
    """The envelope and content of one message, from whichever shard holds it."""
    for shard in shard_paths(config):
        with open_shard(config, shard) as spool:
            envelope = spool.envelope(queue_id)
            if envelope is None:
                continue
            try:
                return envelope, spool.content(queue_id)
            except KeyError:
                break  # removed between the two reads: delivered just now
    raise NoSuchMessage(queue_id)


def split_content(content: bytes) -> tuple[bytes, bytes]:
    """Headers (with their line ends) and body; the empty line between them is in neither.
    Content without an empty line is all headers (RFC 5322 section 3.5: the body is optional)."""
    if content.startswith(b"\r\n"):
        return b"", content[2:]
    headers, separator, body = content.partition(b"\r\n\r\n")
    if not separator:
        return content, b""
    return headers + b"\r\n", body


def _time(epoch: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(epoch))


def _recipient_lines(recipient: Recipient) -> list[str]:
    details = [f"status: {recipient.status}", f"attempts: {recipient.attempts}"]
    if recipient.dsn:
        details.append(f"dsn: {recipient.dsn}")
    if recipient.status == "deferred" and recipient.next_attempt:
        details.append(f"next attempt: {_time(recipient.next_attempt)}")
    if recipient.relay:
        details.append(f"relay: {recipient.relay}")
    lines = [f"recipient: {recipient.address}", "    " + ", ".join(details)]
    if recipient.last_reply:
        lines.append(f"    reason: {recipient.last_reply}")
    return lines


def format_envelope(envelope: Envelope) -> list[str]:
    lines = [
        f"message_size: {envelope.size}",
        f"message_arrival_time: {_time(envelope.arrival)}",
        f"sender: {envelope.sender}",
    ]
    for name in ("client", "message_id", "ret", "envid"):
        if getattr(envelope, name):
            lines.append(f"{name}: {getattr(envelope, name)}")
    for recipient in envelope.recipients:
        lines += _recipient_lines(recipient)
    return lines


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def format_message(envelope: Envelope, content: bytes, sections: tuple[str, ...] = SECTIONS,
                   active: frozenset[str] = frozenset()) -> str:
    """postcat's layout: ``*** ENVELOPE RECORDS queue/QID ***`` … ``*** MESSAGE FILE END …``."""
    where = f"{queue_name(envelope, active)}/{envelope.queue_id}"
    headers, body = split_content(content)
    lines = []
    if "envelope" in sections:
        lines += [f"*** ENVELOPE RECORDS {where} ***", *format_envelope(envelope)]
    if "headers" in sections or "body" in sections:
        lines.append(f"*** MESSAGE CONTENTS {where} ***")
    text = ""
    if "headers" in sections:
        text += _text(headers)
    if "headers" in sections and "body" in sections:
        text += "\r\n"
    if "body" in sections:
        text += _text(body)
    if text:
        lines += text.replace("\r\n", "\n").removesuffix("\n").split("\n")
    lines.append(f"*** MESSAGE FILE END {where} ***")
    return "\n".join(lines) + "\n"


def show_message(config: Config, queue_id: str, out: TextIO, *, as_json: bool = False,
                 sections: tuple[str, ...] = SECTIONS, err: TextIO | None = None) -> int:
    envelope, content = find_message(config, queue_id)
    active = active_ids(config, err)
    if not as_json:
        out.write(format_message(envelope, content, sections, active))
        return 0
    headers, body = split_content(content)
    record: dict = json_record(envelope, active) if "envelope" in sections else {
        "queue_name": queue_name(envelope, active), "queue_id": envelope.queue_id}
    if "headers" in sections:
        record["headers"] = _text(headers)
    if "body" in sections:
        record["body"] = _text(body)
    out.write(json.dumps(record) + "\n")
    return 0
