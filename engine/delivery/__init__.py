"""Delivery agents: what the queue manager hands over, and what comes back.

The queue manager decides *when* (engine.qmgr); an agent only carries one message's recipients
for one next hop and reports a result per recipient. The class of a failure is the retry
decision: a transient one defers, a permanent one bounces (as slimta's relay errors).
"""

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

Status = Literal["sent", "deferred", "bounced"]


@dataclass(frozen=True)
class NextHop:
    """Where a recipient goes. ``mx_lookup`` is False for Postfix's ``[host]:port`` form."""

    transport: str  # "smtp" (issue 5 adds lmtp, local, pipe, error, discard)
    host: str  # a domain to look up MX for, or a host name / IP literal
    port: int = 25
    mx_lookup: bool = True
    # the setting this next hop came from when it is a relay host ("relayhost",
    # "sender_dependent_relayhost_maps"; "" otherwise): a lookup failure there is the
    # administrator's to fix, so it defers (Postfix's "relayhost configuration problem")
    relayhost: str = field(default="", compare=False)

    @cached_property
    def destination(self) -> str:
        """The queue manager's per-destination key (transport + next hop), as in Postfix."""
        host = self.host if self.mx_lookup else f"[{self.host}]"
        return f"{self.transport}:{host}:{self.port}"


class DeliveryError(Exception):
    """A failure that applies to every recipient of the attempt."""

    def __init__(self, dsn: str, text: str, relay: str = "none") -> None:
        super().__init__(text)
        self.dsn = dsn
        self.text = text
        self.relay = relay


class TransientFailure(DeliveryError):
    """4xx, connection failure, timeout, DNS SERVFAIL: the recipients are deferred."""


class PermanentFailure(DeliveryError):
    """5xx, null MX, NXDOMAIN: the recipients bounce."""


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's outcome. ``reply`` is what goes in ``status=… (reply)`` in the log."""

    recipient: str
    status: Status
    dsn: str
    reply: str
    relay: str = "none"
    # deferred when the session broke before any of the message went: another MX host of the
    # same delivery may take it (Postfix keeps such recipients for the next host)
    next_mx: bool = field(default=False, compare=False)


@dataclass
class DeliveryRequest:
    """One message, some of its recipients, one next hop."""

    queue_id: str
    sender: str
    recipients: list[str]
    content: bytes
    nexthop: NextHop
    body_8bit: bool = False
    smtputf8: bool = False  # the sender asked for SMTPUTF8 (RFC 6531)
    # RFC 3461 DSN request as the spool stores it, passed on when the next hop offers DSN
    # (§5.2.1): RET ("FULL" / "HDRS", "" = not given) and ENVID (xtext) for the message;
    # NOTIFY ("SUCCESS,FAILURE,DELAY" / "NEVER") and ORCPT ("addr-type;xtext") per recipient
    # address, a recipient without an entry (or with "") having none.
    ret: str = ""
    envid: str = ""
    notify: dict[str, str] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)


@dataclass
class DeliveryOutcome:
    """Per-recipient results plus timings for Postfix's ``delays=a/b/c/d`` (c and d here)."""

    results: list[RecipientResult]
    connect_seconds: float = 0.0  # c: DNS, connect, greeting, EHLO (and TLS later)
    transfer_seconds: float = 0.0  # d: MAIL … end of DATA
    conn_use: int = 1  # the connection's Nth transaction; Postfix logs conn_use=N when N > 1
    # The server offered DSN, so the request's DSN parameters went with the transaction and the
    # next hop now owes the notices: no "relayed" success notice from here (RFC 3461 §5.2.1).
    dsn_passed: bool = False
    # warnings the agent met on the way (local(8): an ignored .forward file), logged by qmgr
    # as "warning: QUEUEID: text" under the agent's service name
    warnings: list[str] = field(default_factory=list)


# ${name} / $name in pipe(8) argv templates and local(8)'s forward_path
MACRO = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def split_local(address: str, delimiter: str) -> tuple[str, str, str]:
    """``(user, extension, domain)`` of ``user+ext@domain`` with ``recipient_delimiter``
    characters (Postfix: any one of them separates the extension)."""
    local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
    extension = ""
    for index, char in enumerate(local):
        if char in delimiter and index > 0:
            local, extension = local[:index], local[index + 1:]
            break
    return local, extension, domain.lower()
