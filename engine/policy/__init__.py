"""Policy: who may send what through this server. ``restrictions``: Postfix's smtpd_*_restrictions
lists; ``access``: access(5) lookup keys and results; ``relay``: mynetworks and our domains.
DNSBLs, SPF, DKIM and milters build on them."""
