"""The error(8) and discard(8) delivery agents: no delivery, only a result per recipient.

The next hop is the reason, optionally led by an RFC 3463 status code (``error:5.7.1 Go away``,
``discard:2.0.0 silenced``), as in Postfix. error bounces (5.0.0 by default; a 4.x.x code
defers), discard reports the mail as sent (2.0.0) with the reason in the log, and with
$myhostname as the reason when the next hop is empty. Both log ``relay=none``.
"""

import re

from engine.config import Config
from engine.delivery import DeliveryOutcome, DeliveryRequest, RecipientResult

_DSN = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?:\s+|$)")


def _reason(text: str, default: str) -> tuple[str, str]:
    """(dsn, reason) of a next hop ``[d.d.d ]reason``."""
    match = _DSN.match(text)
    if match is None:
        return default, text
    return match.group(0).strip(), text[match.end():]


async def error(request: DeliveryRequest, config: Config) -> DeliveryOutcome:
    dsn, reason = _reason(request.nexthop.host, "5.0.0")
    if dsn.startswith("2"):  # error(8) never reports success
        dsn = "5" + dsn[1:]
    status = "deferred" if dsn.startswith("4") else "bounced"
    return DeliveryOutcome([RecipientResult(r, status, dsn, reason or "mail delivery error")
                            for r in request.recipients])


async def discard(request: DeliveryRequest, config: Config) -> DeliveryOutcome:
    dsn, reason = _reason(request.nexthop.host, "2.0.0")
    if not dsn.startswith("2"):
        dsn = "2" + dsn[1:]
    return DeliveryOutcome([RecipientResult(r, "sent", dsn, reason or config.myhostname)
                            for r in request.recipients])
