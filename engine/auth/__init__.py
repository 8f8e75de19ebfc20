"""SMTP AUTH (RFC 4954): SASL exchanges (sasl), password schemes (schemes) and Dovecot's
passwd-file (passwd_file). Only sasl is imported by the sans-I/O core; the others do I/O or
heavy hashing and run in the adapter's executor and the ``tern passwd`` command."""
