"""``cidr:/path``: "network/prefix result" lines (Postfix's cidr_table(5)), first match wins.

For client addresses (check_client_access). Trusts the administrator's file; a malformed line
raises TableError naming file:line. Lookups take any string: one that is no IP address finds
nothing.
"""

import ipaddress

from engine.tables import Table, TableError
from engine.tables.text import read_source


class CidrTable(Table):
    def __init__(self, spec: str, path: str) -> None:
        super().__init__(spec)
        self._rules: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        for number, line in read_source(path):
            pattern, _, value = line.replace("\t", " ").partition(" ")
            value = value.strip()
            if not value:
                raise TableError(f'{path}:{number}: expected "network/prefix result", '
                                 f'got "{line}"')
            text = pattern
            if text.startswith("["):  # "[2001:db8::]/32", as in mynetworks
                text = text.replace("[", "", 1).replace("]", "", 1)
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError as error:
                raise TableError(f'{path}:{number}: bad network "{pattern}": {error}') from None
            self._rules.append((network, value))

    def get(self, key: str) -> str | None:
        try:
            address = ipaddress.ip_address(key)
        except ValueError:
            return None
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network, value in self._rules:
            if address.version == network.version and address in network:
                return value
        return None
