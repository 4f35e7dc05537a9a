"""Built-in tools, one module each. A module that defines `create(config: ToolConfig) -> Tool` is a tool: adding a
tool is adding a file here, nothing else to edit."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
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
    that define `create`), each with its section of `options`: keyed by the tool's name, or by its module's."""
    options = options or {}
    names = [f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]
    found: dict[str, Tool[Any]] = {}
    origin: dict[str, str] = {}  # tool name -> module name
    used: set[str] = set()
    for module_name in [*names, *extra_modules]:
        short = module_name.rpartition(".")[2]
        if short.startswith("_") or module_name in _NOT_TOOLS:
            continue
        module = importlib.import_module(module_name)
        create = getattr(module, "create", None)
        if create is None:
            raise ValueError(f"tool module {module_name} defines no create(config) function")
        key = _options_key(module, options)
        tool = create(ToolConfig(data_dir=data_dir, options=dict(options.get(key, {})) if key else {}))
        if key is not None and key not in (short, module_name) and tool.name != key:
            raise ValueError(
                f"tools.{key}: module {module_name} defines a tool named {key!r}, but its create() built "
                f"{tool.name!r}; name the options after the tool it builds"
            )
        if tool.name in found:
            raise ValueError(f"two tools are named {tool.name!r} (the second from {module_name})")
        if key is not None:
            used.add(key)
        found[tool.name] = tool
        origin[tool.name] = module_name
    unknown = set(options) - used
    misplaced = sorted(unknown & set(found))
    if misplaced:
        name = misplaced[0]
        raise ValueError(
            f"tools.{name}: module {origin[name]} builds tool {name!r} from a class defined elsewhere, so its "
            f"options cannot be found by the tool's name before it is built: key them tools.{origin[name]}"
        )
    if unknown:
        raise ValueError(f"config names unknown tools: {', '.join(sorted(unknown))}; known: {', '.join(found)}")
    return found


def _options_key(module: ModuleType, options: Mapping[str, Any]) -> str | None:
    """Which section of `tools.<name>` is this module's. Options go to `create`, so they must be found before the
    tool exists: by the names of the tool classes the module defines (a module may be named otherwise than its
    tool, `tool_modules: [acme.probe_tool]` building `probe`), else by the module's own name."""
    short = module.__name__.rpartition(".")[2]
    candidates = [*_tool_names(module), short, module.__name__]
    keys = list(dict.fromkeys(name for name in candidates if name in options))
    if len(keys) > 1:
        raise ValueError(
            f"tools.{' and tools.'.join(keys)} all name module {module.__name__}, which builds one tool: keep one"
        )
    return keys[0] if keys else None


def _tool_names(module: ModuleType) -> list[str]:
    """The names of the Tool classes defined in `module` (not those it imports: tracking_snapshot imports
    query_database's class, and must not take its options)."""
    return [
        cls.name
        for cls in vars(module).values()
        if inspect.isclass(cls)
        and issubclass(cls, Tool)
        and cls.__module__ == module.__name__
        and isinstance(getattr(cls, "name", None), str)
    ]
