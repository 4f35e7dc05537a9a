"""Tool call policies, one small unit each: circuit breaker, rate limiter, result cache, retry backoff, the per-tool
policy resolved from the tool's declaration and the config, and the stages that apply them (admit, guarded, fallback),
composed once per tool by `pipeline.py`. `service/executor.py` runs a call through them."""
