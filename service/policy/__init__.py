"""Tool call policies, one small unit each: circuit breaker, rate limiter, result cache, retry backoff, and the
per-tool policy resolved from the tool's declaration and the config. `service/executor.py` composes them."""
