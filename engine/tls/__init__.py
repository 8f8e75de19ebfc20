"""TLS for Tern's SMTP server: STARTTLS (RFC 3207) and implicit TLS on port 465 (RFC 8314).

How TLS is layered, and why. The bytes are encrypted by the event loop's own TLS
(``loop.start_tls(transport, protocol, context, server_side=True)``, which uvloop implements
natively over OpenSSL's memory BIOs) with a standard-library ``ssl.SSLContext``: the record layer
stays in C, next to the socket, and the SMTP adapter (engine.smtpd.session) keeps one
``asyncio.Protocol`` that simply gets a new transport once the handshake is done. The sans-I/O
core (engine.smtp.server) never sees TLS: it answers STARTTLS with a request event, and on
``220 Ready to start TLS`` throws away whatever plaintext the client pipelined behind the command
(the CVE-2011-0411 class) and forgets HELO and the transaction; the adapter then runs the
handshake and calls ``ServerSession.tls_started()``. Implicit TLS ("smtps") uses the same
``start_tls`` call at the start of the session rather than ``create_server(ssl=...)``, so that a
PROXY protocol header can still be read in plaintext before the handshake. pyOpenSSL, the
design's TLS library, does what the standard library cannot: it checks certificate chains and
keys when the configuration is loaded (``certs.check_key_pair``: the chain parses, the key
matches, the certificate has not expired) so a bad file is a one-line error naming file and key
instead of a failed handshake in production, and (issue 5) it will give the SMTP client the peer
chain DANE needs. engine.tls.server builds the contexts: TLS 1.2 and later by default, AEAD-only
ECDHE ciphers for TLS 1.2, no compression, server cipher preference, and per-domain certificates
chosen by SNI from ``tls_server_sni_maps``.

The SMTP client's TLS (engine.tls.client, engine.tls.dane) uses the same loop ``start_tls``,
client side, from engine.delivery.smtp. DANE needs the server's whole chain, which Python 3.11's
``ssl`` does not publish (``SSLObject.get_unverified_chain`` is public from 3.13). Decision: keep
the loop's TLS (no second TLS stack on the delivery path) and read the chain from the SSLObject's
C object, whose ``get_unverified_chain`` exists since 3.10 (``client.peer_chain``; it uses the
public method where there is one, and with neither only the leaf is known, so DANE-TA fails
closed while DANE-EE still works from ``getpeercert(binary_form=True)``). pyOpenSSL then checks
that the leaf chains up to the DANE-TA certificate (an ``X509Store`` holding only that anchor).
The CA trust of the client (engine.tls.trust: Postfix's smtp_tls_CAfile, smtp_tls_CApath,
tls_append_default_CA) is checked the same way after a CERT_NONE handshake, so every level logs
Postfix's Trusted/Untrusted/Verified/Anonymous line and only the policy decides. TLS-RPT (RFC
8460) is in engine.tls.tlsrpt (the pure record, results and report), tlsrpt_record (what a
delivery records), tlsrpt_store (the result files) and tlsrpt_send (the daily reports by mail
through Tern's own queue, or HTTPS).

This package's ``__init__`` imports nothing, so the configuration loader can use the pure
``protocols`` module without pulling ``ssl`` into the sans-I/O cores.
"""
