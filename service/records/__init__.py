"""Durable records: the audit log (one HMAC chain) and dead letters, on SQLite by default."""
