"""MTA-STS (RFC 8461), the pure part: the ``_mta-sts`` TXT record, the policy file, MX pattern
matching and the policy cache (max_age and id). No I/O and no clock of its own (``now`` is
passed in): the DNS lookup and the HTTPS fetch are engine.tls.sts_fetch's, and
engine.delivery.smtp applies the policy (enforce: only matching MX hosts, each with a
certificate valid for its name, as the "verify" level, in the Web PKI: smtp_tls_CAfile/CApath,
else the system's CAs (engine.tls.trust); testing: logged, opportunistic TLS; none: nothing).

Trusts nothing it parses: the TXT record and the policy come from the network. A malformed
record or policy is "no policy" (RFC 8461 §3.1, §3.2: the sender acts as if none existed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: at most one year
MAX_POLICY_SIZE = 65536  # §3.3: a policy body larger than this is refused

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MODES = ("enforce", "testing", "none")


class StsError(ValueError):
    """A record or policy that does not follow RFC 8461."""

    kind = ""  # the TLS-RPT result type when it is not the default (sts_fetch)


def parse_txt(strings: list[str]) -> str:
    """The policy id of a ``_mta-sts`` TXT record (its strings already joined per record, RFC
    8461 §3.1): "v=STSv1; id=20160831085700Z;". Raises StsError."""
    fields = [f.strip() for f in strings[0].split(";")] if len(strings) == 1 else None
    if fields is None:
        raise StsError(f"expected one STSv1 TXT record, found {len(strings)}")
    if not fields or fields[0] != "v=STSv1":
        raise StsError("the record does not start with v=STSv1")
    policy_id = None
    for item in fields[1:]:
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals:
            raise StsError(f"malformed field {item!r}")
        if key == "id":
            if not _ID.fullmatch(value):
                raise StsError(f"bad id {value!r}")
            policy_id = value
    if policy_id is None:
        raise StsError("no id field")
    return policy_id


def select_txt(records: list[str]) -> list[str]:
    """The TXT records that are MTA-STS records (start with v=STSv1): others are ignored."""
    return [r for r in records if r.startswith("v=STSv1")]


@dataclass(frozen=True)
class StsPolicy:
    """A parsed policy file. ``mx``: the patterns ("mail.example.com", "*.example.net")."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""

    def mx_allowed(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def lines(self) -> tuple[str, ...]:
        """The policy as its file's lines (TLS-RPT's "policy-string", RFC 8460 §4.4)."""
        return ("version: STSv1", f"mode: {self.mode}", *(f"mx: {mx}" for mx in self.mx),
                f"max_age: {self.max_age}")


def parse_policy(body: bytes, policy_id: str = "") -> StsPolicy:
    """The policy file (§3.2: "key: value" lines, CRLF or LF). Raises StsError."""
    if len(body) > MAX_POLICY_SIZE:
        raise StsError("policy larger than 64 KiB")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise StsError("policy is not ASCII") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise StsError(f"malformed line {line[:40]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)  # the first occurrence counts
    if fields.get("version") != "STSv1":
        raise StsError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in _MODES:
        raise StsError(f"bad mode {mode!r}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise StsError(f"bad max_age {age!r}")
    if mode != "none" and not mx:
        raise StsError("no mx pattern")
    return StsPolicy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), policy_id)


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: a pattern matches the MX host name exactly (case-insensitively), or "*.domain"
    matches exactly one label to the left of domain."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


class PolicyCache:
    """Policies per domain, kept until their max_age runs out (§5.1). A fresh TXT id that
    differs from the cached policy's says the policy changed: fetch again (§3.3).

    Also the fetches that failed, by domain and TXT id, for FAILURE_HOLD seconds: a domain
    whose policy server is down or broken is not fetched again (up to a minute's timeout) for
    every message meanwhile; a new id is fetched at once. At most MAX_FAILURES are kept.
    ``refresh_due`` says when a cached policy should be fetched again before it expires."""

    FAILURE_HOLD = 300.0
    REFRESH_MARGIN = 86400.0  # a cached policy is fetched again when less than this remains
    MAX_FAILURES = 10000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[StsPolicy, float]] = {}
        self._failures: dict[str, tuple[str, float]] = {}  # domain → (TXT id, retry at)

    def clear(self) -> None:
        self._entries.clear()
        self._failures.clear()

    def failed(self, domain: str, txt_id: str, now: float) -> None:
        """The fetch of ``domain``'s policy ``txt_id`` failed at ``now``."""
        if len(self._failures) >= self.MAX_FAILURES:
            self._failures = {d: f for d, f in self._failures.items() if f[1] > now}
            if len(self._failures) >= self.MAX_FAILURES:
                self._failures.pop(next(iter(self._failures)))
        self._failures[domain.lower()] = (txt_id, now + self.FAILURE_HOLD)

    def recently_failed(self, domain: str, txt_id: str, now: float) -> bool:
        """Whether the fetch of this policy id failed less than FAILURE_HOLD seconds ago."""
        entry = self._failures.get(domain.lower())
        return entry is not None and entry[0] == txt_id and now < entry[1]

    def get(self, domain: str, now: float, txt_id: str | None = None) -> StsPolicy | None:
        """The cached policy, or None when there is none, it expired, or ``txt_id`` (the id in
        DNS now) differs from the cached one."""
        entry = self._entries.get(domain.lower())
        if entry is None:
            return None
        policy, expires = entry
        if now >= expires:
            del self._entries[domain.lower()]
            return None
        if txt_id is not None and txt_id != policy.policy_id:
            return None
        return policy

    def refresh_due(self, domain: str, now: float) -> bool:
        """Whether the cached policy of ``domain`` nears its end: less than half its max_age,
        or than REFRESH_MARGIN seconds, remain."""
        entry = self._entries.get(domain.lower())
        if entry is None:
            return False
        policy, expires = entry
        return expires - now < min(policy.max_age / 2, self.REFRESH_MARGIN)

    def put(self, domain: str, policy: StsPolicy, now: float) -> None:
        self._entries[domain.lower()] = (policy, now + policy.max_age)
        self._failures.pop(domain.lower(), None)
