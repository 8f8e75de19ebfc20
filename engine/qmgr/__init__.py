"""qmgr: the queue manager stage. ``scheduler`` decides (pure, clock injected); ``manager`` runs
the decisions on the event loop, hands jobs to delivery agents and records their results."""
