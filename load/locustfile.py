"""Locust load for Tern's SMTP intake: each task sends one 1 KB message.

    locust -f load/locustfile.py --headless -u 20 -r 20 -t 30s --host smtp://127.0.0.1:2525

Each simulated user keeps one SMTP session open (as a sending MTA's connection cache would) and
sends MAIL/RCPT/DATA per task with smtplib; the time of each transaction, from MAIL FROM to the
reply to the final dot, is reported to locust as a request ``SMTP send``. A failed transaction
(any 4xx/5xx, a dropped connection) is reported as a failure and the session is reopened at the
next task (its connect and EHLO time are reported as ``SMTP connect``). See load/README.md.
"""

import os
import smtplib
import time
from urllib.parse import urlsplit

from locust import User, constant, task

MESSAGE_SIZE = 1024
SENDER = os.environ.get("TERN_LOAD_SENDER", "load@example.org")
RECIPIENT = os.environ.get("TERN_LOAD_RECIPIENT", "sink@example.net")


def message(size: int = MESSAGE_SIZE) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: tern load\r\n"
            "Message-ID: <load@example.org>\r\n\r\n").encode()
    line = b"x" * 62 + b"\r\n"  # 64 bytes a line
    body = line * ((size - len(head)) // len(line))
    return head + body + b"y" * (size - len(head) - len(body) - 2) + b"\r\n"


MESSAGE = message()


class SmtpUser(User):
    """Sends 1 KB messages as fast as the server answers (no think time)."""

    wait_time = constant(0)
    host = "smtp://127.0.0.1:2525"

    def on_start(self) -> None:
        where = urlsplit(self.host if "://" in self.host else f"smtp://{self.host}")
        if where.scheme != "smtp":
            raise ValueError(f"--host must be smtp://HOST:PORT, not {self.host}")
        self.address = (where.hostname or "127.0.0.1", where.port or 25)
        self.client: smtplib.SMTP | None = None

    def on_stop(self) -> None:
        self._drop(quit=True)

    def _fire(self, name: str, started: float, length: int, exception=None) -> None:
        self.environment.events.request.fire(
            request_type="SMTP", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})

    def _drop(self, quit: bool = False) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if quit:
                client.quit()
            else:
                client.close()
        except (OSError, smtplib.SMTPException):
            pass

    def _connect(self) -> bool:
        started = time.perf_counter()
        try:
            client = smtplib.SMTP(timeout=30)
            client.connect(*self.address)
            client.ehlo("load.example.org")
        except (OSError, smtplib.SMTPException) as error:
            self._fire("connect", started, 0, error)
            return False
        self.client = client
        self._fire("connect", started, 0)
        return True

    @task
    def send(self) -> None:
        if self.client is None and not self._connect():
            time.sleep(0.1)  # a refused connect: do not spin
            return
        started = time.perf_counter()
        try:
            refused = self.client.sendmail(SENDER, [RECIPIENT], MESSAGE)
            if refused:
                raise smtplib.SMTPRecipientsRefused(refused)
        except (OSError, smtplib.SMTPException) as error:
            self._fire("send", started, 0, error)
            self._drop()
            return
        self._fire("send", started, len(MESSAGE))
