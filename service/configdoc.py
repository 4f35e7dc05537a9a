"""The configuration reference, `docs/configuration.md`, made from the config models: every section's keys with
their type, default and description, so that the page cannot drift from the code.

`python -m service.configdoc` prints it (`make docs` writes it); `--check FILE` exits 1 when FILE is not what it
would print (`make check` and CI run that, as they check `generated/` against `protos/`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

import tools
from service.config import ENV_VARS, Config
from tools.policy import ToolPolicy

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"

# The two maps whose values are models the Config cannot name: options per tool, and policy overrides per tool.
_POLICIES = "policies"
_TOOLS = "tools"

_HEADER = """\
# Configuration reference

<!-- Generated from the config models by `make docs` (python -m service.configdoc); do not edit by hand. -->

Defaults need no file. `--config FILE` (or `AGENT_CONFIG`) reads YAML; command-line flags beat environment
variables, which beat the file, which beats the defaults. An unknown key, a value of the wrong type or out of range,
or an address that is not HOST:PORT stops the start with one `error: …` line and exit 1. The README's
[Configuration](../README.md#configuration) shows a small file.

| flag | environment | what |
|---|---|---|
| `--config FILE` | `AGENT_CONFIG` | the YAML file |
| `--listen HOST:PORT` | `AGENT_LISTEN` | `listen` |
| `--metrics-listen HOST:PORT` | `AGENT_METRICS_LISTEN` | `metrics_listen` |
| | `AGENT_DATA_DIR` | `data_dir` |
| `--workers N` | `AGENT_WORKERS` | `workers` ([operations.md](operations.md#workers)) |
| `--log-level LEVEL` | `AGENT_LOG_LEVEL` | DEBUG, INFO (default), WARNING, ERROR or CRITICAL, any case |
| | `AGENT_AUDIT_KEY` | audit keys, over `audit.key_file` ([audit.md](audit.md)) |
| | `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL` | Claude's key (the scripted model runs without it), and a gateway |
| | `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_*` | traces ([operations.md](operations.md#traces)) |

Sections: {sections}.
"""


def render() -> str:
    """The whole page."""
    sections = list(_sections())
    index = ", ".join(f"[`{title}`](#{_anchor(title)})" for title, _ in sections)
    return _HEADER.format(sections=index) + "".join(body for _, body in sections)


def _sections() -> Iterator[tuple[str, str]]:
    yield from _model_sections("", Config, Config())
    yield from _model_sections(f"{_POLICIES}.<tool>", ToolPolicy, None, intro=_POLICY_INTRO)
    for name, options in _tool_options():
        intro = f"Options of the built-in tool `{name}`."
        owner = options.__module__.rpartition(".")[2]
        if owner != name:
            intro += f" The same as [`{_TOOLS}.{owner}`](#{_anchor(f'{_TOOLS}.{owner}')}): it reads that database."
        yield from _model_sections(f"{_TOOLS}.{name}", options, None, intro=intro)


_POLICY_INTRO = (
    "How the executor calls a tool. Each tool declares its own policy; `policies.<tool>` overrides any field of it, "
    "and an unknown tool or field stops the start. The defaults below are a tool's that declares nothing. See "
    "[tools.md](tools.md#tool-policies)."
)


def _model_sections(
    prefix: str, model: type[BaseModel], instance: BaseModel | None, *, intro: str | None = None
) -> Iterator[tuple[str, str]]:
    """The section of `model` at `prefix` (its scalar keys in one table), then one section per nested model.
    `instance` gives the defaults where the parent's default differs from the class's (auth.anonymous)."""
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel], BaseModel | None]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        default = getattr(instance, name) if instance is not None else _default(field)
        sub = _model_of(field.annotation)
        if sub is not None:
            child = default if isinstance(default, BaseModel) else None
            nested.append((_item_key(key, field.annotation), sub, child))
            if isinstance(default, BaseModel) and not _nullable(field.annotation):
                continue  # always present: its section says it all
        rows.append(_row(key, model, field, default))
    title = prefix or "top level"
    text = intro or _docstring(model)
    body = f"\n## `{title}`\n\n" if prefix else "\n## top level\n\n"
    if text:
        body += text + "\n\n"
    if rows:
        body += "| key | type | default | description |\n|---|---|---|---|\n" + "".join(rows)
    yield title, body
    for key, sub, child in nested:
        yield from _model_sections(key, sub, child)


def _row(key: str, model: type[BaseModel], field: FieldInfo, default: Any) -> str:
    description = (field.description or "").replace("<", "&lt;")  # <data_dir> is not an HTML tag
    sub = _model_of(field.annotation)
    if sub is not None:
        item = _item_key(key, field.annotation)
        description += f" ([`{item}`](#{_anchor(item)}))"
    if key in ENV_VARS:
        description += f"; env `{ENV_VARS[key]}`"
    if model is Config and key in (_POLICIES, _TOOLS):
        target = f"{_POLICIES}.<tool>" if key == _POLICIES else "tools.http_request"
        description += f" ([`{target}`](#{_anchor(target)}))"
    return f"| `{key}` | {_cell(_type(field))} | {_cell(_show(default))} | {_cell(description)} |\n"


def _default(field: FieldInfo) -> Any:
    if field.is_required():
        return _REQUIRED
    return field.get_default(call_default_factory=True)


class _Required:
    def __repr__(self) -> str:
        return "required"


_REQUIRED = _Required()


def _show(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if value is _REQUIRED:
        return "*required*"
    if isinstance(value, BaseModel):
        return "on, see its section"
    return f"`{json.dumps(_plain(value), ensure_ascii=False)}`"


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        # A path inside the checkout is shown relative to it: the page must not depend on where it was made.
        return str(value.relative_to(ROOT)) if value.is_absolute() and value.is_relative_to(ROOT) else str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _type(field: FieldInfo) -> str:
    limits = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                limits.append(f"{sign} {bound}")
    return _name(field.annotation) + (f", {', '.join(limits)}" if limits else "")


def _name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_name(arg) for arg in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("…" if arg is Ellipsis else _name(arg) for arg in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, optional, or the items of a list (auth.callers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _nullable(annotation: Any) -> bool:
    return type(None) in get_args(annotation)


def _item_key(key: str, annotation: Any) -> str:
    return f"{key}[]" if get_origin(annotation) is list else key


def _tool_options() -> Iterator[tuple[str, type[BaseModel]]]:
    """Each built-in tool module's `Options` model, found as `tools.load_tools` finds the tools."""
    for module_info in sorted(pkgutil.iter_modules(tools.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name in ("base", "policy"):
            continue
        module = importlib.import_module(f"tools.{module_info.name}")
        options = getattr(module, "Options", None)
        if isinstance(options, type) and issubclass(options, BaseModel):
            yield module_info.name, options


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    if model.__doc__ == BaseModel.__doc__:
        return ""
    return " ".join(doc.split())


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    return "".join(c for c in title.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.configdoc", description=__doc__)
    parser.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE differs from the page")
    args = parser.parse_args(argv)
    page = render()
    if args.check is None:
        sys.stdout.write(page)
        return 0
    try:
        current = args.check.read_text()
    except OSError as exc:
        print(f"{args.check}: {exc.strerror}; run 'make docs' and commit it", file=sys.stderr)
        return 1
    if current != page:
        print(f"{args.check} is stale: run 'make docs' and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
