"""Benchmarks of the agent service against a bare gRPC server and FastAPI SSE endpoints (`python -m bench`)."""
