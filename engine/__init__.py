"""Tern: a mail transfer agent. SMTP in, durable LMDB spool, SMTP out."""

__version__ = "0.1.0"
