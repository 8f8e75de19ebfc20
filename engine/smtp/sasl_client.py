"""Client-side SASL for SMTP AUTH (RFC 4954): which mechanism to use, and what to send.

Sans-I/O and stateless: engine.smtp.client runs the AUTH stage with what these functions say.
Two mechanisms, PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login), both of which send
the password itself, so Postfix's security options decide where they may go: Cyrus SASL gives
neither of them the properties that ``noplaintext``, ``noactive``, ``nodictionary`` or
``mutual_auth`` ask for, so any of those in force rules both out (``noanonymous`` rules out
neither). Postfix applies ``smtp_sasl_security_options`` to a plaintext session and
``smtp_sasl_tls_security_options`` to one under TLS; the caller passes the result of both as
``SaslLogin.plaintext`` / ``SaslLogin.under_tls``.
Trusts the caller's credentials; the server's mechanism list is only compared, never echoed.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")  # what this client speaks, in the order it prefers them
SECURITY_OPTIONS = frozenset({"noplaintext", "noactive", "nodictionary", "noanonymous",
                              "mutual_auth"})
# options that PLAIN and LOGIN do not satisfy (Cyrus's plugin properties for both)
_EXCLUDE_PLAINTEXT = frozenset({"noplaintext", "noactive", "nodictionary", "mutual_auth"})


def allows_plaintext(options: Iterable[str]) -> bool:
    """Whether Postfix-style SASL security ``options`` let a password-sending mechanism
    (PLAIN, LOGIN) be used."""
    return not _EXCLUDE_PLAINTEXT.intersection(option.lower() for option in options)


@dataclass(frozen=True)
class SaslLogin:
    """What the client authenticates with: the username and password (from
    smtp_sasl_password_maps), the mechanisms smtp_sasl_mechanism_filter leaves (upper case;
    empty: no filter), and whether PLAIN/LOGIN may go on a plaintext session (``plaintext``)
    and on a TLS one (``under_tls``)."""

    username: str
    password: str
    mechanism_filter: tuple[str, ...] = ()
    plaintext: bool = False
    under_tls: bool = True

    def __repr__(self) -> str:  # never a password in a traceback or a debug line
        return f"SaslLogin(username={self.username!r}, password=<hidden>)"


def offered(extensions: Mapping[str, str]) -> list[str]:
    """The mechanisms of the server's EHLO AUTH line (upper case, in its order), also from the
    old ``AUTH=LOGIN PLAIN`` form some servers still send; [] when AUTH is not offered."""
    words: list[str] = []
    for keyword, params in extensions.items():
        if keyword == "AUTH":
            words += params.split()
        elif keyword.startswith("AUTH="):
            words += [keyword[5:], *params.split()]
    seen: list[str] = []
    for word in words:
        word = word.upper()
        if word and word not in seen:
            seen.append(word)
    return seen


def filtered(login: SaslLogin, mechanisms: list[str]) -> list[str]:
    """``mechanisms`` that smtp_sasl_mechanism_filter lets through (all without a filter)."""
    if not login.mechanism_filter:
        return mechanisms
    return [m for m in mechanisms if m in login.mechanism_filter]


def choose(login: SaslLogin, mechanisms: list[str], tls_active: bool) -> str | None:
    """The mechanism to use among the (filtered) offered ``mechanisms``: the first one the
    server lists that this client speaks and the security options allow; None if none."""
    if not (login.under_tls if tls_active else login.plaintext):
        return None
    for mechanism in mechanisms:
        if mechanism in MECHANISMS:
            return mechanism
    return None


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def exchange(mechanism: str, login: SaslLogin) -> tuple[bytes, list[bytes]]:
    """The AUTH command line for ``mechanism`` (PLAIN with its initial response, RFC 4954 §4)
    and the responses to the server's 334 challenges, in order (LOGIN: username, password)."""
    user = login.username.encode("utf-8")
    password = login.password.encode("utf-8")
    if mechanism == "PLAIN":  # RFC 4616: [authzid] NUL authcid NUL passwd
        return b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password) + b"\r\n", []
    if mechanism == "LOGIN":
        return b"AUTH LOGIN\r\n", [_b64(user) + b"\r\n", _b64(password) + b"\r\n"]
    raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
