"""A tool's effective policy: what the tool declares (`Tool.policy`), overridden field by field by `policies.<name>`
in the config, checked against the set of tools at startup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from tools.base import Tool
from tools.policy import ToolPolicy


class PolicyError(ValueError):
    """The policy configuration names an unknown tool or does not fit the schema."""


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings: `override` wins; a nested mapping is merged, anything else (None included) replaces."""
    out = dict(base)
    for key, value in override.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = merge(current, value)
        else:
            out[key] = value
    return out


def resolve(tools: Mapping[str, Tool[Any]], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, ToolPolicy]:
    """Every tool's policy, with requires/fallback checked to name known tools."""
    unknown = set(overrides) - set(tools)
    if unknown:
        raise PolicyError(f"policies name unknown tools: {', '.join(sorted(unknown))}; known: {', '.join(tools)}")
    policies: dict[str, ToolPolicy] = {}
    for name, tool in tools.items():
        declared = tool.policy
        if name in overrides:
            try:
                declared = ToolPolicy.model_validate(merge(declared.model_dump(), overrides[name]))
            except ValidationError as exc:
                raise PolicyError(f"invalid policy for {name}: {exc}") from exc
        for other in (*declared.requires, *([declared.fallback] if declared.fallback else [])):
            if other not in tools or other == name:
                raise PolicyError(f"policy of {name} refers to {other!r}, which is not another known tool")
        policies[name] = declared
    return policies
