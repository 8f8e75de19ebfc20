"""MTA-STS (RFC 8461) I/O: the ``_mta-sts`` TXT lookup and the HTTPS policy fetch, with the
pure rules of engine.tls.mtasts and one process-wide cache. The policy host is resolved through
Tern's own resolver (not getaddrinfo), its certificate checked against the Web PKI roots (or
``smtp_mta_sts_CAfile``) and its name (``mta-sts.DOMAIN``); redirects are not followed (§3.3).
Any failure is "no policy" unless a cached one is still valid (§5.1)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time

import dns.exception
import dns.resolver

from engine.delivery import DeliveryError
from engine.tls.mtasts import (
    MAX_POLICY_SIZE,
    PolicyCache,
    StsError,
    StsPolicy,
    parse_policy,
    parse_txt,
    select_txt,
)

CACHE = PolicyCache()
FETCH_TIMEOUT = 60.0  # §3.3: senders SHOULD allow at least a minute
MAX_HEADER_SIZE = 16384  # the response's status line and header fields, and a chunk-size line


async def txt_id(resolver, domain: str) -> str | None:
    """The policy id in ``_mta-sts.DOMAIN`` TXT, or None (no record, or malformed)."""
    try:
        answer = await resolver.resolve(f"_mta-sts.{domain}.", "TXT", search=False)
    except (dns.exception.DNSException, OSError):
        return None
    records = select_txt([b"".join(r.strings).decode("ascii", "replace") for r in answer])
    try:
        return parse_txt(records) if records else None
    except StsError:
        return None


async def fetch(config, addresses, domain: str) -> bytes:
    """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt; the body of a 200 text/plain.
    The body must be complete: as long as its Content-Length, or a chunked body up to its
    last chunk; it is read up to there and no further (a server that keeps the connection
    open despite "Connection: close" costs nothing). A body ended only by the connection's
    close is refused: the stream does not tell a TLS close_notify from a cut TCP connection,
    so a truncated policy would look complete (§3.3 wants it whole or not at all)."""
    host = f"mta-sts.{domain}"
    context = verifying_context(config.smtp_mta_sts_CAfile)
    last: Exception = StsError(f"no address for {host}")
    for address in addresses:
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    address, config.smtp_mta_sts_https_port, ssl=context, server_hostname=host,
                    limit=MAX_HEADER_SIZE)
                try:
                    writer.write(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                                 "Connection: close\r\n\r\n".encode())
                    return await _response(reader)
                finally:  # the policy is read (or refused): no close_notify exchange to wait
                    writer.transport.abort()  # for with a server that keeps the connection
                    with contextlib.suppress(OSError, ssl.SSLError):
                        await writer.wait_closed()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            last = StsError("truncated response" if isinstance(exc, asyncio.IncompleteReadError)
                            else "response header too large")
        except (OSError, ssl.SSLError, TimeoutError, StsError) as exc:
            last = exc
    error = StsError(f"policy fetch from {host} failed: {last}")
    if isinstance(last, ssl.SSLCertVerificationError):
        error.kind = "sts-webpki-invalid"
    raise error




@functools.lru_cache(maxsize=16)  # a process has one setting; tests make many
def verifying_context(cafile: str) -> ssl.SSLContext:
    """One verifying client context per CA file for the process (loading the system's CA
    bundle for every fetch costs milliseconds of CPU)."""
    return ssl.create_default_context(cafile=cafile or None)


async def _response(reader: asyncio.StreamReader) -> bytes:
    """The policy body of one HTTP/1.1 response. Raises StsError, IncompleteReadError (the
    connection ended early) or LimitOverrunError (a header block over MAX_HEADER_SIZE)."""
    headers = _head(await reader.readuntil(b"\r\n\r\n"))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _chunked(reader)
    length = headers.get("content-length", "")
    if not length.isdigit():
        raise StsError("policy response without Content-Length")
    if int(length) > MAX_POLICY_SIZE:
        raise StsError("policy larger than 64 KiB")
    return await reader.readexactly(int(length))


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body (RFC 9112 §7.1) up to its last chunk, at most MAX_POLICY_SIZE bytes
    (every chunk but the last has a byte, so the loop ends within that many rounds)."""
    body = b""
    while True:
        size = (await reader.readuntil(b"\r\n")).split(b";")[0].strip()
        try:
            count = int(size, 16)
        except ValueError:
            raise StsError("malformed chunked response") from None
        if count == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields, ignored (bounded by the reader's line limit)
            return body
        if count < 0 or len(body) + count > MAX_POLICY_SIZE:
            raise StsError("policy larger than 64 KiB")
        chunk = await reader.readexactly(count + 2)
        if chunk[-2:] != b"\r\n":
            raise StsError("malformed chunked response")
        body += chunk[:-2]


def _head(head: bytes) -> dict[str, str]:
    """The header fields of a 200 text/plain response (lower-case names). Raises StsError for
    any other status (3xx included: §3.3, redirects are not followed) or media type."""
    lines = head.decode("latin-1").split("\r\n")
    if lines[0].split(" ")[1:2] != ["200"]:
        raise StsError(f"HTTP status {lines[0][:40]!r}")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    if headers.get("content-type", "").split(";")[0].strip().lower() != "text/plain":
        raise StsError("policy is not text/plain")
    return headers


async def sts_policy(config, dns_resolver, resolver, domain: str,
                     failures: list[tuple[str, str]] | None = None) -> StsPolicy | None:
    """The domain's policy: the cached one while valid and its id unchanged, else fetched.
    A failed fetch of an announced policy goes to ``failures`` as (TLS-RPT result type,
    why): "sts-webpki-invalid" (the HTTPS certificate), "sts-policy-invalid" (the file),
    else "sts-policy-fetch-error". A cached policy near its end is fetched again in the
    background (§5.1: refreshed before it expires, so that a policy in force never lapses
    while its domain is written to)."""
    now = time.monotonic()
    policy_id = await txt_id(dns_resolver, domain)
    cached = CACHE.get(domain, now, policy_id)
    if cached is not None:
        if policy_id is not None and CACHE.refresh_due(domain, now):
            _refresh_later(config, resolver, domain, policy_id)
        return cached
    if policy_id is None:
        return CACHE.get(domain, now)  # §5.1: a valid cached policy outlives a missing record
    if CACHE.recently_failed(domain, policy_id, now):
        return CACHE.get(domain, now)  # reported when it failed; not fetched again so soon
    try:
        return await _fetch_policy(config, resolver, domain, policy_id, now)
    except (StsError, DeliveryError) as error:
        if failures is not None:
            failures.append((getattr(error, "kind", None) or "sts-policy-fetch-error",
                             str(error)))
        CACHE.failed(domain, policy_id, now)
        return CACHE.get(domain, now)


async def _fetch_policy(config, resolver, domain: str, policy_id: str, now: float) -> StsPolicy:
    """Fetch, parse and cache ``domain``'s policy. Raises StsError (``kind``: the TLS-RPT
    result type) or DeliveryError (the policy host did not resolve)."""
    addresses = await resolver.addresses(f"mta-sts.{domain}")
    body = await fetch(config, addresses, domain)
    try:
        policy = parse_policy(body, policy_id)
    except StsError as error:
        error.kind = "sts-policy-invalid"
        raise
    CACHE.put(domain, policy, now)
    return policy


_REFRESHING: dict[str, asyncio.Task] = {}
MAX_REFRESHING = 64  # background refreshes at once; more wait for a later message


def _refresh_later(config, resolver, domain: str, policy_id: str) -> None:
    """Start one background refresh of ``domain``'s policy (none when one runs already or
    MAX_REFRESHING do). A failure leaves the cached policy in force until it expires."""
    key = domain.lower()
    if key in _REFRESHING or len(_REFRESHING) >= MAX_REFRESHING:
        return

    async def refresh() -> None:
        try:
            await _fetch_policy(config, resolver, domain, policy_id, time.monotonic())
        except (StsError, DeliveryError):
            pass
        finally:
            _REFRESHING.pop(key, None)

    _REFRESHING[key] = asyncio.get_running_loop().create_task(refresh())
