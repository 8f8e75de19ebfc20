"""Policy: who may send what through this server (relay control now; restrictions, DNSBLs,
SPF, DKIM and milters build on it)."""
