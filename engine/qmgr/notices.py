"""Notices: which delivery status notifications a message owes, and queueing them.

RFC 3461 NOTIFY decides who wants what; engine.bounce composes each notice; cleanup queues it,
so notices travel the normal path. Mail from <> gets none (its failures are double bounces,
for the postmaster when notify_classes has 2bounce, sent from double-bounce@ so that they
cannot loop). Trusts the queue manager's envelopes; composes nothing itself.
"""

from engine import bounce
from engine.config import Config
from engine.log import Maillog
from engine.spool import Envelope, Recipient


class Notices:
    def __init__(self, config: Config, maillog: Maillog, spool, clock, cleanup=None) -> None:
        self.config = config
        self.maillog = maillog
        self.spool = spool
        self.clock = clock
        self.cleanup = cleanup  # engine.cleanup.Cleanup; None: no notices at all

    def will_notify(self, envelope: Envelope, recipient: Recipient, kind: str) -> bool:
        return (self.cleanup is not None and self.owed(envelope, recipient, kind)
                and self.recipient_for(envelope, kind)[0] is not None)

    def owed(self, envelope: Envelope, recipient: Recipient, kind: str) -> bool:
        """RFC 3461 NOTIFY: NEVER, or a list of SUCCESS / FAILURE / DELAY; not given means
        FAILURE and DELAY. A null-sender message gets no notice (its failures are double
        bounces, for the postmaster when notify_classes has 2bounce)."""
        notify = {n.strip() for n in recipient.notify.upper().split(",") if n.strip()}
        wanted = kind in notify if notify else kind in ("FAILURE", "DELAY")
        return wanted and "NEVER" not in notify

    async def send(self, envelope: Envelope) -> None:
        """Queue the notices owed. A recipient is marked notified only once its notice is
        queued; if one cannot be (spool full…), the message keeps a notice_retry time and the
        queue manager comes back to it, while its recipient states are stored regardless."""
        if self.cleanup is None:
            return
        now = self.clock()
        envelope.notice_retry = 0.0
        try:
            await self._queue(envelope, now)
        except Exception as error:  # noqa: BLE001 - a notice must not cost the message its state
            self.maillog.line("qmgr", f"warning: {envelope.queue_id}: cannot queue a notice: "
                                      f"{error!r}")
            envelope.notice_retry = now + self.config.minimal_backoff_time

    async def _queue(self, envelope: Envelope, now: float) -> None:
        failed = [r for r in envelope.recipients if r.status == "bounced" and not r.notified]
        delivered = [r for r in envelope.recipients if r.status == "sent" and not r.notified]
        delayed = []
        warn_after = self.config.delay_warning_time
        if warn_after > 0 and now - envelope.arrival >= warn_after:
            delayed = [r for r in envelope.recipients
                       if r.status == "deferred" and not r.warned]
        content = None
        for kind, recipients, build, label in (
                ("FAILURE", failed, bounce.failure_notice, "non-delivery"),
                ("DELAY", delayed, bounce.delay_notice, "delay"),
                ("SUCCESS", delivered, bounce.success_notice, "delivery status")):
            owed = [r for r in recipients if self.owed(envelope, r, kind)]
            to, who, notice_sender = self.recipient_for(envelope, kind)
            if owed and to is not None:
                if content is None:
                    content = self.spool.content(envelope.queue_id)
                notice = await self.cleanup.inject(
                    notice_sender, [to], build(envelope, owed, content, self.config, now),
                    smtputf8=envelope.smtputf8)  # Postfix: SMTPUTF8 requested as the original
                self.maillog.line("bounce", f"{envelope.queue_id}: {who} {label} "
                                            f"notification: {notice.queue_id}")
            elif owed and kind == "FAILURE" and envelope.sender == self.double_bounce_sender:
                self.maillog.line("bounce", f"{envelope.queue_id}: undeliverable postmaster "
                                            "notification discarded")
            for recipient in recipients:  # done with these, notice or not
                if kind == "DELAY":
                    recipient.warned = True
                else:
                    recipient.notified = True

    @property
    def double_bounce_sender(self) -> str:
        """Postfix's double-bounce@$myorigin: the sender of notices to the postmaster, whose
        own failures are discarded, so that notices about notices cannot loop."""
        return f"double-bounce@{self.config.myhostname}"

    def recipient_for(self, envelope: Envelope,
                          kind: str) -> tuple[str | None, str, str]:
        """(recipient, who for the log, envelope sender) of a notice, or (None, "", "")."""
        if envelope.sender == self.double_bounce_sender:
            return None, "", ""
        if envelope.sender:
            return envelope.sender, "sender", ""
        if kind == "FAILURE" and "2bounce" in self.config.notify_classes:
            return (self.config.double_bounce_notice_recipient, "postmaster",
                    self.double_bounce_sender)
        return None, "", ""
