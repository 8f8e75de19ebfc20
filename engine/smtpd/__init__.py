"""smtpd: the SMTP server stage. ``engine.smtp.server`` holds the dialogue (sans-I/O);
``engine.smtpd.session`` is the thin asyncio adapter that feeds it bytes and answers its
requests with relay control and cleanup. It never touches the spool: finished messages go to
``engine.cleanup.Cleanup``, and the session waits for the commit before it answers. The
adapter's concerns are mixins, one module each: ``proxied`` (PROXY, XCLIENT, XFORWARD),
``auth``, ``starttls`` and ``limits`` (connection limits, anvil rates)."""
