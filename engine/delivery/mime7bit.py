"""8BITMIME to 7BIT conversion for a next hop that does not offer 8BITMIME (RFC 6152 §3).

As Postfix does by default (disable_mime_output_conversion = no): every MIME leaf part whose
body has 8-bit bytes and is not already base64 or quoted-printable is re-encoded as
quoted-printable, with its Content-Transfer-Encoding header replaced; multipart bodies and
message/rfc822 parts are walked; a message without MIME-Version is sent as it is (there is
nothing to label it with). Pure bytes in, bytes out; trusts nothing in the message: nesting is
bounded (mime_nesting_limit), and a part it cannot parse is left as it was.
"""

import quopri
import re

NESTING_LIMIT = 100  # Postfix's mime_nesting_limit
_ENCODED = (b"base64", b"quoted-printable")
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def downgrade(content: bytes) -> bytes:
    """``content`` (CRLF line ends) with its 8-bit MIME parts as quoted-printable."""
    if content.isascii():
        return content
    if content.count(b"\n") != content.count(b"\r\n"):  # bare LF: CRLF, as DATA sends it
        content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if b"\r\n\r\n" not in content:  # no body: nothing to convert
        return content
    headers, body = _split(content)
    if _header(headers, b"mime-version") is None:
        return content
    return _entity(headers, body, 0)


def _split(entity: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (folded ones kept joined, CRLF included) and the body."""
    end = entity.find(b"\r\n\r\n")
    if entity.startswith(b"\r\n"):
        return [], entity[2:]
    head, body = (entity, b"") if end < 0 else (entity[: end + 2], entity[end + 4 :])
    lines: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if lines and line[:1] in (b" ", b"\t"):
            lines[-1] += line
        else:
            lines.append(line)
    return lines, body


def _header(headers: list[bytes], name: bytes) -> bytes | None:
    for line in headers:
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            return b" ".join(value.split())
    return None


def _entity(headers: list[bytes], body: bytes, depth: int) -> bytes:
    head = b"".join(headers)
    if body.isascii() or depth > NESTING_LIMIT:
        return head + b"\r\n" + body
    ctype = (_header(headers, b"content-type") or b"text/plain").lower()
    encoding = (_header(headers, b"content-transfer-encoding") or b"7bit").lower()
    if ctype.startswith(b"multipart/"):
        return head + b"\r\n" + _multipart(headers, body, depth)
    if ctype.startswith(b"message/rfc822") and encoding in (b"7bit", b"8bit"):
        inner_headers, inner_body = _split(body)
        return head + b"\r\n" + _entity(inner_headers, inner_body, depth + 1)
    if encoding in _ENCODED:
        return head + b"\r\n" + body
    kept = [h for h in headers if h.partition(b":")[0].strip().lower()
            != b"content-transfer-encoding"]
    kept.append(b"Content-Transfer-Encoding: quoted-printable\r\n")
    encoded = quopri.encodestring(body.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    return b"".join(kept) + b"\r\n" + encoded


def _multipart(headers: list[bytes], body: bytes, depth: int) -> bytes:
    match = _BOUNDARY.search(_header(headers, b"content-type") or b"")
    if match is None:
        return body
    delimiter = b"--" + (match.group(1) or match.group(2))
    # the parts are what lies between delimiter lines; preamble and epilogue stay as they are
    pieces = re.split(rb"(^" + re.escape(delimiter) + rb"(?:--)?[ \t]*\r\n?)", body,
                      flags=re.MULTILINE)
    out = [pieces[0]]
    for index in range(1, len(pieces) - 1, 2):
        line, part = pieces[index], pieces[index + 1]
        out.append(line)
        if line.rstrip().endswith(delimiter + b"--"):  # the epilogue
            out.append(part)
            continue
        ends_crlf = part.endswith(b"\r\n")  # the CRLF before the next delimiter is its own
        inner = part[:-2] if ends_crlf else part
        part_headers, part_body = _split(inner)
        out.append(_entity(part_headers, part_body, depth + 1) + (b"\r\n" if ends_crlf else b""))
    return b"".join(out)
