"""TLS-RPT (RFC 8460) delivery of the daily reports: for each policy domain with results of a
finished UTC day, its ``_smtp._tls`` TXT record says where reports go; each "mailto:" gets a
§5.3 message injected into Tern's own queue (through cleanup, as a bounce is), each "https:" a
§5.4 POST of the gzip'd report. Runs once a day in the server (``daily``) or on demand
(``tern tls-report``, through the control socket); never on a delivery's path.

Trusts the configuration and the stored results; the TXT record and the HTTPS server's
answers come from the network (parsed by engine.tls.tlsrpt, checked here).
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import uuid
from urllib.parse import unquote, urlsplit

import dns.exception
import dns.resolver

from engine.dns import Resolver, make_resolver
from engine.tls import tlsrpt
from engine.tls.sts_fetch import verifying_context
from engine.tls.tlsrpt_store import ResultStore, today

HTTPS_TIMEOUT = 60.0
RESPONSE_LIMIT = 65536


RETRY_DAYS = 3  # a day's report that no URI took is tried again at this many daily runs


def _days_ago(days: int) -> str:
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)
    return then.strftime("%Y-%m-%d")


class ReportError(Exception):
    """A report could not be handed over (HTTPS refused, unreachable)."""


async def rua_for(resolver, domain: str) -> tuple[str, ...] | None:
    """Where ``domain`` wants its reports (§3), or None (no usable record, or DNS failed)."""
    try:
        answer = await resolver.resolve(f"_smtp._tls.{domain}.", "TXT", search=False)
    except (dns.exception.DNSException, OSError):
        return None
    return tlsrpt.parse_record([b"".join(r.strings).decode("ascii", "replace") for r in answer])


async def post(config, resolver: Resolver, uri: str, body: bytes) -> int:
    """POST ``body`` (application/tlsrpt+gzip) to the https ``uri`` (§5.4), its host resolved
    with Tern's resolver and its certificate checked for that name against the Web PKI (or
    ``tlsrpt_CAfile``). Returns the 2xx status; raises ReportError otherwise."""
    parts = urlsplit(uri)
    host, port = parts.hostname or "", parts.port or 443
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context = verifying_context(config.tlsrpt_CAfile)
    request = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               f"Content-Type: {tlsrpt.MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body
    last: Exception = ReportError(f"no address for {host}")
    try:
        addresses = await resolver.addresses(host)
    except Exception as error:  # noqa: BLE001 - a DeliveryError (DNS): this URI fails
        raise ReportError(f"{host}: {error}") from None
    for address in addresses:
        try:
            async with asyncio.timeout(HTTPS_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    address, port, ssl=context, server_hostname=host)
                try:
                    writer.write(request)
                    await writer.drain()
                    status_line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, ssl.SSLError, TimeoutError) as error:
            last = error
            continue
        fields = status_line.decode("latin-1").split(" ")
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        if 200 <= status < 300:
            return status
        raise ReportError(f"{uri}: HTTP status {status_line[:60]!r}")
    raise ReportError(f"{uri}: {last}")


def _address(uri: str) -> str:
    return unquote(uri[len("mailto:"):].split("?", 1)[0])


async def send_reports(config, cleanup, maillog, day: str, *,
                       resolver: Resolver | None = None) -> list[str]:
    """Send ``day``'s reports (see the module docstring) and mark its results sent, except
    those of a domain whose report no URI took: they stay for the next run. Returns
    one line per report handed over: "DOMAIN mailto:ADDRESS QUEUEID" or "DOMAIN URI"."""
    store = ResultStore(config.queue_directory)
    files = store.files(day)
    domain_of_ours = config.effective_mydomain
    results = store.read(day)
    reports = tlsrpt.build_reports(
        results, day=day,
        organization=config.tlsrpt_organization_name or domain_of_ours,
        contact=config.tlsrpt_contact_info or f"postmaster@{domain_of_ours}",
        report_id=f"{day}.{uuid.uuid4().hex}")
    resolver = resolver or Resolver(config)
    txt = make_resolver(config)
    submitter = config.myhostname
    sender = config.tlsrpt_sender_address or f"postmaster@{domain_of_ours}"
    sent = []
    undelivered = set()  # domains whose report no URI took: their results wait for a retry
    for domain, report in reports.items():
        rua = await rua_for(txt, domain)
        if rua:
            undelivered.add(domain)
        for uri in rua or ():
            try:
                if uri.lower().startswith("mailto:"):
                    address = _address(uri)
                    message = tlsrpt.report_message(
                        report, submitter=submitter, sender=sender, recipient=address,
                        now=datetime.datetime.now(datetime.UTC))
                    envelope = await cleanup.inject(sender, [address], message)
                    sent.append(f"{domain} mailto:{address} {envelope.queue_id}")
                else:
                    await post(config, resolver, uri, tlsrpt.compress(report))
                    sent.append(f"{domain} {uri}")
            except Exception as error:  # noqa: BLE001 - one URI failing spares the others
                maillog.line("tlsrpt", f"warning: report for {domain} to {uri}: {error}")
                continue
            maillog.line("tlsrpt", f"report for {domain} of {day} sent to {uri}")
            undelivered.discard(domain)
    kept = [r for r in results if r.policy_domain in undelivered] if undelivered else []
    store.mark_sent(files)
    if kept:  # only these go again at the next run: the others' reports are not repeated
        store.keep(day, kept)
    return sent


async def daily(config, cleanup, maillog) -> None:
    """Forever (until cancelled): send the reports of every finished day with results, then
    sleep until a minute past the next UTC midnight."""
    store = ResultStore(config.queue_directory)
    while True:
        for day in store.days():
            if day < _days_ago(RETRY_DAYS):  # a report nobody took for days: give it up
                maillog.line("tlsrpt", f"warning: reports of {day} not sent, given up")
                store.mark_sent(store.files(day))
            elif day < today():
                try:
                    await send_reports(config, cleanup, maillog, day)
                except Exception as error:  # noqa: BLE001 - retried at the next run
                    maillog.line("tlsrpt", f"warning: reports of {day}: {error!r}")
        now = datetime.datetime.now(datetime.UTC)
        midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=1, second=0,
                                                              microsecond=0)
        await asyncio.sleep((midnight - now).total_seconds())
