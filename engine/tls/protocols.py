"""``smtpd_tls_protocols``: Postfix's protocol list turned into a lowest and highest version.

Pure (no ssl import): the configuration loader validates with it. Trusts nothing in the text.
"""

import re

#: Postfix's protocol names (SSL_get_version(3)), oldest first.
VERSIONS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: The oldest version Tern will speak at all: OpenSSL 3 has no SSLv2/SSLv3.
OLDEST = "TLSv1"

#: TLS 1.2 ciphers: forward secrecy (ECDHE) and AEAD only, strongest first (TLS 1.3's suites
#: are all AEAD and stay OpenSSL's default). Postfix's tls_high_cipherlist, made stricter.
MODERN_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
])


def parse_protocols(text: str) -> tuple[str, str]:
    """(lowest, highest) version names for a Postfix ``smtpd_tls_protocols`` value.

    Accepts Postfix 3.6's bounds (``>=TLSv1.2``, ``<=TLSv1.3``), the legacy exclusions
    (``!SSLv2, !SSLv3, !TLSv1``) and plain inclusions (``TLSv1.2 TLSv1.3``), separated by
    whitespace, commas or colons; an empty value allows every version. Raises ValueError."""
    lowest, highest = 0, len(VERSIONS) - 1
    allowed = set(range(len(VERSIONS)))
    included: set[int] = set()
    for item in (part for part in re.split(r"[\s,:]+", text) if part):
        prefix, name = re.fullmatch(r"(>=|<=|!)?(.*)", item).groups()
        if name not in VERSIONS:
            raise ValueError(f"unknown protocol {name!r} (expected one of {', '.join(VERSIONS)},"
                             " with >=, <= or !)")
        index = VERSIONS.index(name)
        if prefix == ">=":
            lowest = max(lowest, index)
        elif prefix == "<=":
            highest = min(highest, index)
        elif prefix == "!":
            allowed.discard(index)
        else:
            included.add(index)
    if included:
        allowed &= included
    allowed = {i for i in allowed if lowest <= i <= highest and i >= VERSIONS.index(OLDEST)}
    if not allowed:
        raise ValueError(f"no TLS protocol version is left by {text!r}")
    low, high = min(allowed), max(allowed)
    if len(allowed) != high - low + 1:
        raise ValueError(f"{text!r} leaves a gap between {VERSIONS[low]} and {VERSIONS[high]}")
    return VERSIONS[low], VERSIONS[high]
