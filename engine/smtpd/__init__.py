"""smtpd: the SMTP server stage. ``engine.smtp.server`` holds the dialogue (sans-I/O);
``engine.smtpd.session`` is the thin asyncio adapter that feeds it bytes and answers its
requests with relay control, cleanup and the spool. It never touches the spool's storage itself:
it hands finished messages to ``Spool.enqueue`` and waits for the commit."""
