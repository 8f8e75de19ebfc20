"""TLS-RPT (RFC 8460): the _smtp._tls record, the report JSON against the RFC's schema (§4.4),
the mail (§5.3) end to end from a real ``tern serve`` into Postfix's smtp-sink
(``tern tls-report``), and the HTTPS POST (§5.4) to a local HTTPS server."""

import asyncio
import dataclasses
import datetime
import email
import email.policy
import gzip
import http.server
import io
import json
import ssl
import threading

import jsonschema
import pytest
from peers import free_port
from tls_certs import make_certs

from engine.config import Config
from engine.log import Maillog
from engine.tls import tlsrpt
from engine.tls.tlsrpt import SessionResult, build_reports, parse_record, report_message
from engine.tls.tlsrpt_send import daily, send_reports
from engine.tls.tlsrpt_store import ResultStore

DAY = "2026-11-20"
STS = ("version: STSv1", "mode: enforce", "mx: mx.example.net", "max_age: 86400")

# RFC 8460 §4.4, as a JSON Schema: every field the RFC defines, required where it says so.
RESULT_TYPES = sorted(tlsrpt.RESULT_TYPES)
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {key: {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"}
                           for key in ("start-datetime", "end-datetime")}},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object", "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": {"type": "string"}},
                        "policy-domain": {"type": "string"},
                        "mx-host": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False},
                "summary": {
                    "type": "object",
                    "required": ["total-successful-session-count",
                                 "total-failure-session-count"],
                    "properties": {key: {"type": "integer", "minimum": 0} for key in (
                        "total-successful-session-count", "total-failure-session-count")},
                    "additionalProperties": False},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": RESULT_TYPES},
                        "sending-mta-ip": {"type": "string"},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string"},
                        "failed-session-count": {"type": "integer", "minimum": 1},
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"}},
                    "additionalProperties": False}}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
}


def result(kind, domain="example.net", policy_type="sts", day=DAY, **fields):
    strings = STS if policy_type == "sts" else ()
    mx = ("mx.example.net",) if policy_type == "sts" else ()
    return SessionResult(day, domain, policy_type, kind, strings, mx, **fields)


# ---- the record (§3) ---------------------------------------------------------------------------


@pytest.mark.parametrize("texts, rua", [
    (["v=TLSRPTv1; rua=mailto:tls@example.net"], ("mailto:tls@example.net",)),
    (["v=TLSRPTv1;rua=mailto:a@example.net,https://r.example.net/v1"],
     ("mailto:a@example.net", "https://r.example.net/v1")),
    (["v=spf1 -all", "v=TLSRPTv1; rua=https://r.example.net/x%2Cy"],
     ("https://r.example.net/x%2Cy",)),
    (["v=TLSRPTv1; ext=1; rua=ftp://x.example, mailto:b@example.net"],
     ("mailto:b@example.net",)),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], None),  # two
    (["v=TLSRPTv1"], None),
    (["v=TLSRPTv2; rua=mailto:a@x.test"], None),
    (["rua=mailto:a@x.test; v=TLSRPTv1"], None),  # the version must come first
    (["v=TLSRPTv1; rua=http://insecure.example/"], None),
    ([], None),
])
def test_record(texts, rua):
    assert parse_record(texts) == rua


# ---- the report (§4) ---------------------------------------------------------------------------


def test_report_follows_the_rfc_schema_and_counts():
    results = [
        result("success"), result("success"),
        result("certificate-expired", sending_ip="127.0.0.1", receiving_mx="mx.example.net",
               receiving_ip="127.0.0.2", reason="num=10:certificate has expired"),
        result("certificate-expired", sending_ip="127.0.0.1", receiving_mx="mx.example.net",
               receiving_ip="127.0.0.2", reason="num=10:certificate has expired"),
        result("starttls-not-supported", receiving_mx="mx2.example.net"),
        result("success", policy_type="no-policy-found"),
        result("success", domain="other.test", policy_type="tlsa"),
        result("success", day="2026-11-21"),  # another day: not in this report
    ]
    reports = build_reports(results, day=DAY, organization="Tern Test",
                            contact="postmaster@tern.test", report_id="r1")
    assert sorted(reports) == ["example.net", "other.test"]
    report = reports["example.net"]
    jsonschema.validate(report, SCHEMA)
    jsonschema.validate(reports["other.test"], SCHEMA)
    assert report["date-range"] == {"start-datetime": "2026-11-20T00:00:00Z",
                                    "end-datetime": "2026-11-20T23:59:59Z"}
    assert (report["organization-name"], report["contact-info"], report["report-id"]) == (
        "Tern Test", "postmaster@tern.test", "r1-example.net")
    sts, none = report["policies"]
    assert sts["policy"] == {"policy-type": "sts", "policy-domain": "example.net",
                             "policy-string": list(STS), "mx-host": ["mx.example.net"]}
    assert sts["summary"] == {"total-successful-session-count": 2,
                              "total-failure-session-count": 3}
    assert sts["failure-details"] == [
        {"result-type": "certificate-expired", "sending-mta-ip": "127.0.0.1",
         "receiving-mx-hostname": "mx.example.net", "receiving-ip": "127.0.0.2",
         "failed-session-count": 2, "failure-reason-code": "num=10:certificate has expired"},
        {"result-type": "starttls-not-supported", "receiving-mx-hostname": "mx2.example.net",
         "failed-session-count": 1}]
    assert none == {"policy": {"policy-type": "no-policy-found", "policy-domain": "example.net"},
                    "summary": {"total-successful-session-count": 1,
                                "total-failure-session-count": 0}}


def test_stored_results_round_trip_and_bad_lines_are_skipped(tmp_path):
    store = ResultStore(tmp_path)
    first = result("sts-webpki-invalid", reason="policy fetch failed")
    store.record(first)
    with (store.directory / f"{DAY}.1.jsonl").open("w") as other:
        other.write(result("success").to_json() + "\n" + '{"day": "torn' + "\n"
                    + json.dumps({"day": DAY, "policy_domain": "x", "policy_type": "sts",
                                  "result": "made-up"}) + "\n")
    assert store.days() == [DAY]
    assert sorted(r.result for r in store.read(DAY)) == ["sts-webpki-invalid", "success"]
    store.mark_sent(store.files(DAY))
    assert store.read(DAY) == [] and store.days() == []


def test_report_message_as_the_rfc_says():
    report = build_reports([result("success")], day=DAY, organization="Tern",
                           contact="postmaster@tern.test", report_id="abc")["example.net"]
    raw = report_message(report, submitter="mx.tern.test", sender="tlsrpt@tern.test",
                         recipient="tls@example.net",
                         now=datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC))
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == ("Report Domain: example.net Submitter: mx.tern.test "
                                  "Report-ID: <abc-example.net>")
    assert message["TLS-Report-Domain"] == "example.net"
    assert message["TLS-Report-Submitter"] == "mx.tern.test"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    begin, end = 1795132800, 1795219199  # 2026-11-20 00:00:00 and 23:59:59 UTC
    assert attachment.get_filename() == (f"mx.tern.test!example.net!{begin}!{end}!"
                                         "abcexamplenet.json.gz")
    assert json.loads(gzip.decompress(attachment.get_content())) == report


# ---- delivery of the reports: HTTPS (§5.4) -------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


class ReportServer:
    """HTTPS on 127.0.0.1 with the test CA's mx.tern.test certificate: keeps every POST."""

    def __init__(self, certs, status=201):
        self.posts = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.posts.append((self.path, self.headers["Content-Type"], body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.default_cert, certs.default_key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def report_server(certs):
    servers = []

    def start(status=201):
        servers.append(ReportServer(certs, status))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def send_day(config, day=DAY):
    stream = io.StringIO()
    maillog = Maillog("mx.tern.test", stream=stream)
    sent = asyncio.run(send_reports(config, None, maillog, day))
    maillog.flush()
    return sent, stream.getvalue()


def test_https_report_is_posted_gzipped(dns_server, report_server, certs, tmp_path):
    https, refusing = report_server(), report_server(status=500)
    dns = dns_server([
        f'_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=https://mx.tern.test:'
        f'{https.port}/v1/tlsrpt,https://mx.tern.test:{refusing.port}/x"',
        "mx.tern.test. 60 IN A 127.0.0.1"], zones=("example.net.", "tern.test."))
    config = Config(myhostname="out.tern.test", queue_directory=tmp_path,
                    dns_servers=(f"{dns[0]}:{dns[1]}",), dns_timeout=2.0,
                    smtp_tlsrpt_enable=True, tlsrpt_CAfile=str(certs.ca))
    store = ResultStore(tmp_path)
    store.record(result("success"))
    store.record(result("certificate-host-mismatch", receiving_mx="mx.example.net"))
    store.record(result("success", domain="no-record.test"))  # no _smtp._tls record: no report
    sent, log = send_day(config)
    assert sent == [f"example.net https://mx.tern.test:{https.port}/v1/tlsrpt"]
    ((path, content_type, body),) = https.posts
    assert (path, content_type) == ("/v1/tlsrpt", "application/tlsrpt+gzip")
    report = json.loads(gzip.decompress(body))
    jsonschema.validate(report, SCHEMA)
    assert report["organization-name"] == "tern.test"  # $mydomain
    assert report["policies"][0]["summary"] == {"total-successful-session-count": 1,
                                                "total-failure-session-count": 1}
    assert len(refusing.posts) == 1
    assert f"warning: report for example.net to https://mx.tern.test:{refusing.port}/x:" in log
    assert "HTTP status" in log
    assert store.days() == []  # the day is done


def test_https_report_to_an_untrusted_server_is_kept_for_the_next_run(dns_server, report_server,
                                                                      certs, tmp_path):
    https = report_server()
    dns = dns_server([f'_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; '
                      f'rua=https://mx.tern.test:{https.port}/"',
                      "mx.tern.test. 60 IN A 127.0.0.1"], zones=("example.net.", "tern.test."))
    other = make_certs(tmp_path / "other")
    config = Config(queue_directory=tmp_path, dns_servers=(f"{dns[0]}:{dns[1]}",),
                    dns_timeout=2.0, smtp_tlsrpt_enable=True, tlsrpt_CAfile=str(other.ca))
    store = ResultStore(tmp_path)
    store.record(result("success"))
    store.record(result("success", domain="no-record.test"))  # no _smtp._tls record
    sent, log = send_day(config)
    assert sent == [] and https.posts == []
    assert "CERTIFICATE_VERIFY_FAILED" in log
    # not marked sent: example.net's results wait for the next run (the other's are done)
    assert store.days() == [DAY]
    assert [r.policy_domain for r in store.read(DAY)] == ["example.net"]
    sent, _ = send_day(dataclasses.replace(config, tlsrpt_CAfile=str(certs.ca)))
    assert sent == [f"example.net https://mx.tern.test:{https.port}/"]
    report = json.loads(gzip.decompress(https.posts[0][2]))
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    assert store.days() == []


# ---- delivery of the reports: mail into Tern's own queue (§5.3), end to end -----------------


def report_of(message):
    parsed = email.message_from_bytes(message.content, policy=email.policy.default)
    assert parsed["TLS-Report-Domain"] == "example.net"
    assert parsed["TLS-Report-Submitter"] == "mx.tern.test"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    (attachment,) = parsed.iter_attachments()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(attachment.get_content()))
    jsonschema.validate(report, SCHEMA)
    return report


def test_mailto_reports_are_queued_and_delivered(tern, dns_server, smtp_sink):
    """A real ``tern serve``: at start it sends the reports of past days by itself (its daily
    task); ``tern tls-report --day`` asks it for one day now (here today's). Each report goes
    through its own queue to the rua address (routed to smtp-sink)."""
    sink = smtp_sink()
    dns = dns_server(['_smtp._tls.example.net. 60 IN TXT '
                      '"v=TLSRPTv1; rua=mailto:tls-reports@reports.test"'],
                     zones=("example.net.",))
    server = tern(transport_maps={"reports.test": f"smtp:{sink.nexthop}"},
                  dns_servers=[f"{dns[0]}:{dns[1]}"], smtp_tlsrpt_enable=True,
                  tlsrpt_organization_name="Tern Test", tlsrpt_sender_address="tlsrpt@tern.test",
                  start=False)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    store = ResultStore(server.directory / "spool")
    store.record(result("success"))
    store.record(result("validation-failure", receiving_mx="mx.example.net",
                        reason="handshake: no shared cipher"))
    store.record(result("success", day=today))
    server.start()
    (message,) = sink.wait_messages(1)  # yesterday's and older: sent at start
    assert (message.sender, message.recipients) == ("tlsrpt@tern.test",
                                                    ("tls-reports@reports.test",))
    report = report_of(message)
    assert report["organization-name"] == "Tern Test"
    assert report["date-range"]["start-datetime"] == f"{DAY}T00:00:00Z"
    assert report["policies"][0]["failure-details"] == [
        {"result-type": "validation-failure", "receiving-mx-hostname": "mx.example.net",
         "failed-session-count": 1, "failure-reason-code": "handshake: no shared cipher"}]
    assert store.days() == [today]  # today is not over: not sent by itself

    done = server.tern("tls-report", "--day", today, "-c", str(server.config_file))
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("example.net mailto:tls-reports@reports.test ")
    server.wait_log("status=sent", count=2)
    first, second = sink.wait_messages(2)
    report = report_of(second)
    assert report["date-range"]["start-datetime"] == f"{today}T00:00:00Z"
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    again = server.tern("tls-report", "--day", today, "-c", str(server.config_file))
    assert again.returncode == 0 and again.stdout == ""  # sent once


def test_tls_report_needs_tlsrpt_enabled(tern):
    server = tern()
    done = server.tern("tls-report", "--day", DAY, "-c", str(server.config_file))
    assert done.returncode == 1
    assert "TLS-RPT is off (smtp_tlsrpt_enable)" in done.stderr
    done = server.tern("tls-report", "--day", "yesterday", "-c", str(server.config_file))
    assert done.returncode == 1
    assert '"day" must be a date, YYYY-MM-DD' in done.stderr


def test_daily_run_gives_up_a_day_whose_reports_were_kept_too_long(tmp_path):
    """Kept results are retried at the next daily runs, not forever: a day older than
    RETRY_DAYS is marked sent with a warning (no lookup, no report)."""
    config = Config(myhostname="out.tern.test", queue_directory=tmp_path, smtp_tlsrpt_enable=True,
                    dns_servers=("127.0.0.1:9",), dns_timeout=0.5)
    store = ResultStore(tmp_path)
    store.keep("2020-01-01", [result("success")])
    stream = io.StringIO()
    maillog = Maillog("mx.tern.test", stream=stream)

    async def one_run():
        task = asyncio.create_task(daily(config, None, maillog))
        for _ in range(200):  # until the run is done and the loop sleeps towards midnight
            await asyncio.sleep(0.01)
            if not store.days():
                break
        task.cancel()

    asyncio.run(one_run())
    maillog.flush()
    assert store.days() == []
    assert "warning: reports of 2020-01-01 not sent, given up" in stream.getvalue()
