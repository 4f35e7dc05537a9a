"""The layer rule, checked: the core (everything under `service/` but the transport) imports nothing of gRPC, protobuf
or the generated code. Only `service/rpc/` (and the composition root and CLI entry above it) may."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import service

# Above the core: the transports (gRPC and HTTP), the application layer both call, the module that wires them to the
# core, the CLI entry, and the shim that keeps `python -m service.client` working.
TOP = ("service.rpc", "service.http", "service.api", "service.wiring", "service.__main__", "service.client")
FORBIDDEN = ("grpc", "google.protobuf", "agent")

# Imports each module in turn and reports the first one after which a forbidden package is loaded.
_PROBE = """
import importlib, json, sys
forbidden = {forbidden!r}
for name in {modules!r}:
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
    if loaded:
        print(json.dumps({{"module": name, "loaded": loaded[:5]}}))
        sys.exit(0)
print(json.dumps(None))
"""


def core_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
    return sorted(n for n in names if not any(n == top or n.startswith(top + ".") for top in TOP))


def test_the_core_modules_are_found() -> None:
    """The check below must not pass by finding nothing to import."""
    core = core_modules()
    for name in ("service.loop", "service.executor", "service.runs", "service.events", "service.errors"):
        assert name in core
    assert not [n for n in core if n.startswith("service.rpc")]


def test_the_core_imports_no_grpc_protobuf_or_generated_code() -> None:
    probe = _PROBE.format(forbidden=FORBIDDEN, modules=core_modules())
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    culprit = json.loads(done.stdout.strip().splitlines()[-1])
    assert culprit is None, f"importing {culprit['module']} loads {', '.join(culprit['loaded'])}: the core must not"
