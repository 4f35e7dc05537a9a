"""Durable runs: checkpoints of a run's durable steps (a finished model turn, a finished tool call, the intent before
an unsafe call) in the records database, so that another process can continue a run whose process died. Why our own
table and not an engine: docs/decisions/0001-durable-execution-engine.md."""
