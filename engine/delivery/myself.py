"""Loop detection for SMTP delivery: the endpoints where this Tern itself takes mail.

Postfix's smtp client drops the MX hosts that are itself (its inet_interfaces and
proxy_interfaces addresses) and every MX host not better than it, and bounces with "mail for
DOMAIN loops back to myself" when none is left (smtp_addr.c). Postfix matches the address at
port 25 only; Tern knows its listeners' ports, so it matches (address, port) pairs: a
``[[listen]]`` table's address and port, any address of this host at a wildcard listener's port
(0.0.0.0, ::), and each ``proxy_interfaces`` address at port 25 (a proxy or NAT in front of
Tern, as Postfix's parameter). Built once per configuration; trusts the configuration.
"""

import ipaddress
import socket

from engine.config import Config

WILDCARDS = ("0.0.0.0", "::")
SMTP_PORT = 25


class Myself:
    """``(address, port) in myself``: whether a connection there would reach this Tern."""

    def __init__(self, config: Config) -> None:
        self._endpoints: set[tuple[str, int]] = set()
        self._any_address_ports: set[int] = set()
        for listener in config.listen:
            if not listener.port:  # a kernel-chosen port: not known before binding
                continue
            if listener.host in WILDCARDS:
                self._any_address_ports.add(listener.port)
                continue
            for address in _addresses(listener.host):
                self._endpoints.add((address, listener.port))
        for address in config.proxy_interfaces:
            self._endpoints.add((_normal(address), SMTP_PORT))
        self._local: dict[str, bool] = {}  # address -> one of this host's (memo)

    def __contains__(self, endpoint: tuple[str, int]) -> bool:
        address, port = endpoint
        address = _normal(address)
        if (address, port) in self._endpoints:
            return True
        return port in self._any_address_ports and self._is_local(address)

    def _is_local(self, address: str) -> bool:
        """Whether ``address`` belongs to this host: a socket binds only to its own addresses
        (and to all of 127.0.0.0/8), which is what a wildcard listener answers on."""
        known = self._local.get(address)
        if known is None:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.bind((address, 0))
                known = True
            except OSError:
                known = False
            if len(self._local) < 4096:  # bounded: MX addresses come from DNS
                self._local[address] = known
        return known


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _addresses(host: str) -> list[str]:
    """A listener's host as addresses (a name such as "localhost" resolved once, at start)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(_normal(str(info[4][0])) for info in infos))
