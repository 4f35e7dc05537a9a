"""`python -m service`: start the agent service."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from service.config import ConfigError, load_config
from service.rpc.server import StartupError, serve
from service.rpc.workers import supervise, work
from service.telemetry import setup_logging
from service.wiring import start

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description="gRPC streaming agent service")
    parser.add_argument("--listen", help="gRPC address HOST:PORT (env AGENT_LISTEN; default 0.0.0.0:50051)")
    parser.add_argument(
        "--metrics-listen",
        help="Prometheus /metrics address HOST:PORT (env AGENT_METRICS_LISTEN; default 0.0.0.0:9464)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ["AGENT_CONFIG"]) if os.environ.get("AGENT_CONFIG") else None,
        help="YAML config file (env AGENT_CONFIG; defaults need no file)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the gRPC port (env AGENT_WORKERS; default 1); above 1 needs a shared state.url",
    )
    # How the supervisor of --workers starts each worker (service/rpc/workers.py); not for people to use.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        type=str.upper,  # logging knows only upper-case names (`AGENT_LOG_LEVEL=info` is common)
        choices=LOG_LEVELS,
        default=os.environ.get("AGENT_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL, any case (env AGENT_LOG_LEVEL; default INFO)",
    )
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # argparse checks the choices of a flag, not of a default from the env
        parser.error(f"AGENT_LOG_LEVEL={args.log_level}: choose from {', '.join(LOG_LEVELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:  # the config comes from the supervisor, resolved
        sys.exit(
            work(
                args.worker, status_fd=args.status_fd, supervisor=args.supervisor, log_level=args.log_level, start=start
            )
        )
    setup_logging(args.log_level)
    try:
        config = load_config(args.config, listen=args.listen, metrics_listen=args.metrics_listen, workers=args.workers)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    if config.workers > 1:
        sys.exit(supervise(config, log_level=args.log_level))
    try:
        asyncio.run(serve(config, start))
    except StartupError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
