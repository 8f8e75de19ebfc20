"""SMTP TLS Reporting (RFC 8460), the pure part: the ``_smtp._tls`` TXT record, one session's
result as the delivery agent records it, and the daily aggregate report (JSON, §4) with its
file name and mail message (§5.3). No I/O and no clock (days and report ids are passed in):
engine.tls.tlsrpt_store keeps the session results, engine.tls.tlsrpt_send looks up where the
reports go and sends them.

Trusts nothing it parses (the TXT record comes from the network); the session results are
Tern's own.
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

#: §4.3: the result types of a failed session ("success" is Tern's word for a session that
#: negotiated TLS as its policy asked).
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",  # §4.3.1 negotiation failures
    "tlsa-invalid", "dnssec-invalid", "dane-required",  # §4.3.2.1 DANE
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",  # §4.3.2.2 MTA-STS
})
POLICY_TYPES = frozenset({"tlsa", "sts", "no-policy-found"})  # §4.4 "policy-type"
MEDIA_TYPE = "application/tlsrpt+gzip"  # §6.4 (the gzip'd JSON, for mail and HTTPS)
_VERSION = re.compile(r"v=TLSRPTv1\s*(;|$)")


def parse_record(texts: list[str]) -> tuple[str, ...] | None:
    """The ``rua`` URIs of a domain from its ``_smtp._tls`` TXT strings (each record's strings
    joined), or None when it publishes no usable record (§3): exactly one record must start
    with "v=TLSRPTv1"; its ``rua`` lists "mailto:" and "https:" URIs separated by commas (a
    comma inside a URI is written %2C); other fields and other schemes are ignored."""
    records = [text.strip() for text in texts if _VERSION.match(text.strip())]
    if len(records) != 1:
        return None
    for field in records[0].split(";")[1:]:
        name, equals, value = field.partition("=")
        if equals and name.strip() == "rua":
            uris = [uri.strip() for uri in value.split(",")]
            usable = tuple(uri for uri in uris
                           if uri.lower().startswith(("mailto:", "https://")) and len(uri) > 8)
            return usable or None
    return None


@dataclass(frozen=True)
class SessionResult:
    """One delivery attempt's TLS outcome for one policy domain (one line of the store)."""

    day: str  # UTC, "YYYY-MM-DD"
    policy_domain: str
    policy_type: str  # POLICY_TYPES
    result: str  # "success" or one of RESULT_TYPES
    policy_string: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()  # the policy's MX patterns (sts) or the host (tlsa)
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason: str = ""  # "failure-reason-code"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> SessionResult:
        """One stored line. Raises ValueError for a line that is not a result."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        for key in ("policy_string", "mx_host"):
            data[key] = tuple(data.get(key) or ())
        result = cls(**data)
        if result.policy_type not in POLICY_TYPES or (
                result.result != "success" and result.result not in RESULT_TYPES):
            raise ValueError(f"unknown result {result.policy_type}/{result.result}")
        return result


def _day_range(day: str) -> tuple[datetime.datetime, datetime.datetime]:
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    return start, start + datetime.timedelta(days=1)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_reports(results: list[SessionResult], *, day: str, organization: str,
                  contact: str, report_id: str) -> dict[str, dict]:
    """The §4.4 report of each policy domain for one UTC day: one "policies" entry per
    distinct policy, with its session counts and failure details grouped by (result type,
    sending IP, receiving MX and IP, reason). ``report_id`` gets "-<domain>" appended."""
    start, end = _day_range(day)
    by_domain: dict[str, dict[tuple, dict]] = {}
    for result in results:
        if result.day != day:
            continue
        key = (result.policy_type, result.policy_string, result.mx_host)
        entry = by_domain.setdefault(result.policy_domain, {}).setdefault(key, {
            "success": 0, "failure": 0, "details": {}})
        if result.result == "success":
            entry["success"] += 1
            continue
        entry["failure"] += 1
        detail = (result.result, result.sending_ip, result.receiving_mx, result.receiving_ip,
                  result.reason)
        entry["details"][detail] = entry["details"].get(detail, 0) + 1
    reports = {}
    for domain, policies in sorted(by_domain.items()):
        entries = []
        for (policy_type, policy_string, mx_host), counts in policies.items():
            policy: dict = {"policy-type": policy_type, "policy-domain": domain}
            if policy_type != "no-policy-found":  # §4.4: absent without a policy
                policy["policy-string"] = list(policy_string)
                if mx_host:
                    policy["mx-host"] = list(mx_host)
            details = []
            for (kind, sending, mx, ip, reason), count in counts["details"].items():
                detail = {"result-type": kind}
                if sending:
                    detail["sending-mta-ip"] = sending
                if mx:
                    detail["receiving-mx-hostname"] = mx
                if ip:
                    detail["receiving-ip"] = ip
                detail["failed-session-count"] = count
                if reason:
                    detail["failure-reason-code"] = reason
                details.append(detail)
            entries.append({
                "policy": policy,
                "summary": {"total-successful-session-count": counts["success"],
                            "total-failure-session-count": counts["failure"]},
                **({"failure-details": details} if details else {}),
            })
        reports[domain] = {
            "organization-name": organization,
            "date-range": {"start-datetime": _rfc3339(start),
                           "end-datetime": _rfc3339(end - datetime.timedelta(seconds=1))},
            "contact-info": contact,
            "report-id": f"{report_id}-{domain}",
            "policies": entries,
        }
    return reports


def compress(report: dict) -> bytes:
    """The report as sent (§5.1: gzip'd JSON), reproducible (no time in the gzip header)."""
    return gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)


def filename(report: dict, submitter: str) -> str:
    """§5.3: "submitter!policy-domain!begin!end!unique-id.json.gz" (times in seconds since
    the epoch; the unique id made of the report id's letters and digits)."""
    domain = report["policies"][0]["policy"]["policy-domain"]
    dates = report["date-range"]
    begin, end = (int(datetime.datetime.strptime(dates[key], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC).timestamp()) for key in ("start-datetime", "end-datetime"))
    unique = re.sub(r"[^A-Za-z0-9]", "", report["report-id"])[:64]
    return f"{submitter}!{domain}!{begin}!{end}!{unique}.json.gz"


def report_message(report: dict, *, submitter: str, sender: str, recipient: str,
                   now: datetime.datetime) -> bytes:
    """The §5.3 mail: Subject "Report Domain: … Submitter: … Report-ID: <…>", the
    TLS-Report-Domain and TLS-Report-Submitter headers, a multipart/report
    (report-type="tlsrpt") holding a short text part and the gzip'd report as
    application/tlsrpt+gzip, attached under its §5.3 file name."""
    domain = report["policies"][0]["policy"]["policy-domain"]
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid(domain=submitter)
    message["Subject"] = (f"Report Domain: {domain} Submitter: {submitter} "
                          f"Report-ID: <{report['report-id']}>")
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain},\n"
        f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}.\n")
    message.add_attachment(compress(report), maintype="application", subtype="tlsrpt+gzip",
                           filename=filename(report, submitter))
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n", max_line_length=998))
