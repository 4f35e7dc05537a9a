"""Built-in tools, one module each. A module that defines `create(config: ToolConfig) -> Tool` is a tool: adding a
tool is adding a file here, nothing else to edit."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tools.base import JSON, Tool, ToolConfig, ToolError

__all__ = ["JSON", "Tool", "ToolConfig", "ToolError", "load_tools"]

_NOT_TOOLS = {f"{__name__}.base", f"{__name__}.policy"}


def load_tools(
    data_dir: Path,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    extra_modules: Sequence[str] = (),
) -> dict[str, Tool[Any]]:
    """Build every tool module of this package, then those of `extra_modules` (dotted names of modules elsewhere
    that define `create`), each with its section of `options` (keyed by tool name, or by module name)."""
    options = options or {}
    names = [f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]
    found: dict[str, Tool[Any]] = {}
    used: set[str] = set()
    for module_name in [*names, *extra_modules]:
        short = module_name.rpartition(".")[2]
        if short.startswith("_") or module_name in _NOT_TOOLS:
            continue
        module = importlib.import_module(module_name)
        create = getattr(module, "create", None)
        if create is None:
            raise ValueError(f"tool module {module_name} defines no create(config) function")
        key = short if short in options else module_name
        tool = create(ToolConfig(data_dir=data_dir, options=dict(options.get(key, {}))))
        if tool.name in found:
            raise ValueError(f"two tools are named {tool.name!r} (the second from {module_name})")
        if key in options:
            used.add(key)
        found[tool.name] = tool
    unknown = set(options) - used
    if unknown:
        raise ValueError(f"config names unknown tools: {', '.join(sorted(unknown))}; known: {', '.join(found)}")
    return found
