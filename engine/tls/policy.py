"""smtp_tls_policy_maps / smtp_tls_security_level: Postfix's policy syntax parsed into a
TlsPolicy, the lookup keys, and the certificate name matching rules. Pure (no ssl import): the
configuration loader and the sans-I/O code can use it. Trusts nothing in the text it parses.
"""

from __future__ import annotations

from dataclasses import dataclass

#: smtp_tls_security_level values Tern implements, weakest first.
LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure")
#: Levels that refuse to deliver without TLS.
MANDATORY = frozenset({"encrypt", "dane", "dane-only", "fingerprint", "verify", "secure"})
#: Levels that look up TLSA records (per MX host, at delivery).
DANE = frozenset({"dane", "dane-only"})
#: Levels that need a CA-verified chain and a name match.
VERIFYING = frozenset({"verify", "secure"})

class PolicyError(ValueError):
    """A policy table entry Tern cannot use (unknown level or attribute)."""


@dataclass(frozen=True)
class TlsPolicy:
    """The TLS requirements for one destination. ``match``: the names (verify/secure; Postfix's
    "hostname", "nexthop", "dot-nexthop" or literal names, ".domain" for subdomains) or the
    fingerprints (fingerprint level) the server's certificate must match."""

    level: str = "none"
    match: tuple[str, ...] = ()
    tlsa: tuple = ()  # engine.tls.dane.Tlsa records (a "dane" policy resolved for one host)
    webpki: bool = False  # MTA-STS: the system's CAs when none is configured (engine.tls.trust)

    @property
    def mandatory(self) -> bool:
        return self.level in MANDATORY


def parse_policy(text: str, *, verify_match: str = "hostname",
                 secure_match: str = "nexthop:dot-nexthop") -> TlsPolicy:
    """A Postfix smtp_tls_policy_maps value ("secure match=.example.com:example.com",
    "fingerprint match=AB:CD:…", "encrypt", "none"). Raises PolicyError."""
    words = text.split()
    if not words:
        raise PolicyError("empty policy")
    level = words[0].lower()
    if level not in LEVELS:
        raise PolicyError(f"unsupported TLS security level {words[0]!r} "
                          f"(supported: {', '.join(LEVELS)})")
    match: list[str] = []
    for attribute in words[1:]:
        name, equals, value = attribute.partition("=")
        if not equals or name.lower() != "match":
            raise PolicyError(f"unsupported policy attribute {attribute!r} (supported: match=)")
        if level == "fingerprint":  # Postfix: fingerprints contain ":", so "|" separates them
            match += [_normal_fingerprint(v) for v in value.split("|") if v]
        else:
            match += [v.lower() for v in value.split(":") if v]
    if not match:
        if level == "fingerprint":
            raise PolicyError("fingerprint level needs match=FINGERPRINT")
        if level == "verify":
            match = verify_match.replace(",", ":").replace(" ", "").lower().split(":")
        elif level == "secure":
            match = secure_match.replace(",", ":").replace(" ", "").lower().split(":")
    return TlsPolicy(level, tuple(m for m in match if m))


def _normal_fingerprint(text: str) -> str:
    return text.replace(":", "").lower()


def policy_lookup_keys(nexthop: str) -> list[str]:
    """Postfix's smtp_tls_policy_maps keys for a next hop as written (route.nexthop_as_written):
    a domain (MX lookup, default port) and then each parent domain with a leading dot
    (example.com → .com); a next hop in brackets or with a port ("[relay.example]:587")
    only as it is."""
    nexthop = nexthop.lower()
    if nexthop.startswith("[") or ":" in nexthop:
        return [nexthop]
    labels = nexthop.rstrip(".").split(".")
    return [".".join(labels)] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


def name_matches(name: str, pattern: str) -> bool:
    """Certificate name (maybe "*.example.com") against one wanted name or ".domain". A
    wildcard with fewer than two labels after it ("*.com") matches nothing, as OpenSSL."""
    if name.startswith("*.") and "." not in name[2:].strip("."):
        return False
    if pattern.startswith("."):
        base = pattern[1:]
        if name.startswith("*."):  # a wildcard covers names one label below its base
            return name[2:] == base or name[2:].endswith(pattern)
        return name.endswith(pattern) and len(name) > len(pattern)
    if name.startswith("*."):
        head, _, rest = pattern.partition(".")
        return bool(head) and rest == name[2:]
    return name == pattern


def wanted_names(policy: TlsPolicy, hostname: str, nexthop: str) -> list[str]:
    """The policy's match list with Postfix's strategy words expanded."""
    nexthop = nexthop.lower().strip("[]").rstrip(".")
    out = []
    for item in policy.match:
        if item == "hostname":
            out.append(hostname.lower().rstrip("."))
        elif item == "nexthop":
            out.append(nexthop)
        elif item == "dot-nexthop":
            out.append("." + nexthop)
        else:
            out.append(item)
    return out
