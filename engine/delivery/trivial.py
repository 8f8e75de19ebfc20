"""The error(8), retry and discard(8) delivery agents: no delivery, a result per recipient.

The next hop is the reason, optionally led by an RFC 3463 status code (``error:5.7.1 Go away``,
``retry:4.3.2 later``, ``discard:2.0.0 silenced``), as in Postfix. error always bounces (5.0.0
by default; its code's class is forced to 5), retry always defers (4.0.0; class 4), as Postfix's
error(8) under its two service names; discard reports the mail as sent (2.0.0) with the reason
in the log, and with $myhostname as the reason when the next hop is empty. All log
``relay=none``.
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


def _all(request: DeliveryRequest, status: str, dsn: str, reason: str) -> DeliveryOutcome:
    return DeliveryOutcome([RecipientResult(r, status, dsn, reason)
                            for r in request.recipients])


async def error(request: DeliveryRequest, config: Config) -> DeliveryOutcome:
    dsn, reason = _reason(request.nexthop.host, "5.0.0")
    return _all(request, "bounced", "5" + dsn[1:], reason or "mail delivery error")


async def retry(request: DeliveryRequest, config: Config) -> DeliveryOutcome:
    dsn, reason = _reason(request.nexthop.host, "4.0.0")
    return _all(request, "deferred", "4" + dsn[1:], reason or "mail delivery deferred")


async def discard(request: DeliveryRequest, config: Config) -> DeliveryOutcome:
    dsn, reason = _reason(request.nexthop.host, "2.0.0")
    return _all(request, "sent", "2" + dsn[1:], reason or config.myhostname)
