"""Shared live state on Redis, behind the core's small protocols (the core never imports a Redis client)."""
