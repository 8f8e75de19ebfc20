"""Credentials for SMTP AUTH to a next hop: smtp_sasl_password_maps searched as Postfix's smtp.

Postfix's order (smtp_sasl_passwd_lookup): with smtp_sender_dependent_authentication the
sender address, then its "@domain"; then the name of the server the client connects to (an MX
host, or the relay host's name); then the next hop as the configuration writes it
("[relay.example]:587", "example.com"). The first ``username:password`` found is used; none
means no AUTH. Keys are looked up in lower case (tables fold theirs when read).

A session authenticated with a sender's own credentials is cached under a key naming that
username (Postfix keys its connection cache by the SASL username when sender-dependent
authentication is on), so another sender's mail never rides on it.
Trusts the administrator's table; the values are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Config
from engine.config.derived import per_config
from engine.delivery import NextHop
from engine.delivery.route import nexthop_as_written
from engine.smtp.sasl_client import SaslLogin, allows_plaintext
from engine.tables import Table, open_table


@per_config
def _table(config: Config) -> Table:
    """One opened smtp_sasl_password_maps per Config object (load_config opened it once
    already, so a broken file stopped start-up)."""
    return open_table(config.smtp_sasl_password_maps)


@dataclass(frozen=True)
class DeliveryAuth:
    """AUTH for one delivery: ``sender_login`` (the sender's own entry, with
    smtp_sender_dependent_authentication) goes first; ``login`` finds the rest by server."""

    config: Config
    sender_login: SaslLogin | None = None

    def cache_key(self, destination: str) -> str:
        """The connection cache key: the destination, and the sender's SASL username."""
        if self.sender_login is None:
            return destination
        return f"{destination}\0sasl={self.sender_login.username}"

    async def login(self, host: str, hop: NextHop) -> SaslLogin | None:
        """The credentials for server ``host`` of next hop ``hop``, or None (no AUTH)."""
        if self.sender_login is not None:
            return self.sender_login
        if not self.enabled:
            return None
        table = _table(self.config)
        for key in (host.lower(), nexthop_as_written(hop).lower()):
            value = await table.lookup(key)
            if value is not None:
                return _parse(self.config, value)
        return None

    @property
    def enabled(self) -> bool:
        return self.config.smtp_sasl_auth_enable and bool(self.config.smtp_sasl_password_maps)


async def for_delivery(config: Config, sender: str) -> DeliveryAuth:
    """The AUTH of a delivery from ``sender`` (its own credentials looked up first when
    smtp_sender_dependent_authentication is on; the null sender has none)."""
    auth = DeliveryAuth(config)
    if not (auth.enabled and config.smtp_sender_dependent_authentication and sender):
        return auth
    table = _table(config)
    sender = sender.lower()
    _, at, domain = sender.rpartition("@")
    for key in (sender, f"@{domain}") if at else (sender,):
        value = await table.lookup(key)
        if value is not None:
            return DeliveryAuth(config, _parse(config, value))
    return auth


def _parse(config: Config, value: str) -> SaslLogin:
    """``username:password`` (no colon: an empty password, as Postfix) with the settings that
    decide the mechanism."""
    username, _, password = value.partition(":")
    return SaslLogin(
        username,
        password,
        mechanism_filter=config.smtp_sasl_mechanism_filter,
        plaintext=allows_plaintext(config.smtp_sasl_security_options),
        under_tls=allows_plaintext(config.smtp_sasl_tls_security_options),
    )
