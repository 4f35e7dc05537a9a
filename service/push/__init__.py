"""Completion push (docs/push.md): a background run's terminal state POSTed, signed, to the caller's callback URL."""
