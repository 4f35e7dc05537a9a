"""Shared live state on Redis: the run store protocol (base.py) and its Redis implementation, and the policies'
shared state (redis_limits.py: rate limits, breakers, result caches)."""
