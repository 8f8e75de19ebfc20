"""MTA-STS (RFC 8461) I/O: the ``_mta-sts`` TXT lookup and the HTTPS policy fetch, with the
pure rules of engine.tls.mtasts and one process-wide cache. The policy host is resolved through
Tern's own resolver (not getaddrinfo), its certificate checked against the Web PKI roots (or
``smtp_mta_sts_CAfile``) and its name (``mta-sts.DOMAIN``); redirects are not followed (§3.3).
Any failure is "no policy" unless a cached one is still valid (§5.1)."""

from __future__ import annotations

import asyncio
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
    """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt; the body of a 200 text/plain."""
    host = f"mta-sts.{domain}"
    context = ssl.create_default_context(cafile=config.smtp_mta_sts_CAfile or None)
    last: Exception = StsError(f"no address for {host}")
    for address in addresses:
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    address, config.smtp_mta_sts_https_port, ssl=context, server_hostname=host)
                try:
                    writer.write(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                                 "Connection: close\r\n\r\n".encode())
                    response = await reader.read(MAX_POLICY_SIZE + 8192)
                    while chunk := await reader.read(MAX_POLICY_SIZE + 8192):
                        response += chunk
                        if len(response) > 2 * MAX_POLICY_SIZE:
                            raise StsError("response too large")
                finally:
                    writer.close()
            return _body(response)
        except (OSError, ssl.SSLError, TimeoutError, StsError) as exc:
            last = exc
    error = StsError(f"policy fetch from {host} failed: {last}")
    if isinstance(last, ssl.SSLCertVerificationError):
        error.kind = "sts-webpki-invalid"
    raise error


def _body(response: bytes) -> bytes:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        raise StsError("malformed HTTP response")
    lines = head.decode("latin-1").split("\r\n")
    if lines[0].split(" ")[1:2] != ["200"]:
        raise StsError(f"HTTP status {lines[0][:40]!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if not headers.get("content-type", "").lower().startswith("text/plain"):
        raise StsError("policy is not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise StsError("chunked policy responses are not supported")
    if headers.get("content-length", "").isdigit():
        body = body[: int(headers["content-length"])]
    return body


async def sts_policy(config, dns_resolver, resolver, domain: str,
                     failures: list[tuple[str, str]] | None = None) -> StsPolicy | None:
    """The domain's policy: the cached one while valid and its id unchanged, else fetched.
    A failed fetch of an announced policy goes to ``failures`` as (TLS-RPT result type,
    why): "sts-webpki-invalid" (the HTTPS certificate), "sts-policy-invalid" (the file),
    else "sts-policy-fetch-error"."""
    now = time.monotonic()
    policy_id = await txt_id(dns_resolver, domain)
    cached = CACHE.get(domain, now, policy_id)
    if cached is not None:
        return cached
    if policy_id is None:
        return CACHE.get(domain, now)  # §5.1: a valid cached policy outlives a missing record
    kind = "sts-policy-fetch-error"
    try:
        addresses = await resolver.addresses(f"mta-sts.{domain}")
        body = await fetch(config, addresses, domain)
        kind = "sts-policy-invalid"
        policy = parse_policy(body, policy_id)
    except (StsError, DeliveryError) as error:
        if failures is not None:
            failures.append((getattr(error, "kind", None) or kind, str(error)))
        return CACHE.get(domain, now)
    CACHE.put(domain, policy, now)
    return policy
