"""Durable records: the audit log (one HMAC chain), dead letters and run summaries; in SQLite files by default, in
PostgreSQL with `records.url` (`postgres.py`)."""
