"""The docs stay true to the code, offline: every relative link in README.md and docs/ reaches a file and heading,
docs/configuration.md is what the config models make, and the tables that copy a contract (events, metrics, flags)
name what the code has."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import service.telemetry  # noqa: F401 - registers the service's metrics
from agent.v1 import agent_pb2
from service import configdoc
from service.__main__ import parse_args
from service.config import Config
from service.rpc.workers import Supervisor
from tools.base import ToolConfig, ToolError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("bench/README.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`+[^`\n]*`+")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slugs(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation but - and _ dropped, spaces as -, and -1, -2…
    after a repeated one."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{page.name}: {target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in slugs(resolved.read_text())):
            problems.append(f"{page.name}: {target}: no heading with that anchor")
    return problems


def test_every_relative_link_reaches_a_file_and_heading() -> None:
    assert len(PAGES) >= 8, PAGES
    problems = [problem for page in PAGES for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## The `runs` section\n\n## Again\n\n## Again\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#the-runs-section) [ok](other.md#again-1) [ok](#title) [web](https://example.com/x)\n"
        "# Title\n\n[gone](missing.md) [no anchor](other.md#nowhere) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#nowhere: no heading with that anchor",
    ]


def test_configuration_reference_is_what_the_models_make() -> None:
    page = ROOT / "docs" / "configuration.md"
    assert page.exists(), "run 'make docs' and commit docs/configuration.md"
    assert page.read_text() == configdoc.render(), "docs/configuration.md is stale: run 'make docs' and commit it"


def test_configdoc_check_fails_on_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "configuration.md"
    page.write_text(configdoc.render().replace("`4096`", "`8192`"))
    assert configdoc.main(["--check", str(page)]) == 1
    assert "stale: run 'make docs'" in capsys.readouterr().err
    assert configdoc.main(["--check", str(tmp_path / "absent.md")]) == 1
    page.write_text(configdoc.render())
    assert configdoc.main(["--check", str(page)]) == 0


def test_every_configuration_key_has_a_type_default_and_description() -> None:
    rows = [line for line in configdoc.render().splitlines() if line.startswith("| `") and line.count("`") >= 2]
    keys = [row.split("|")[1].strip() for row in rows]
    for must in ("`listen`", "`model.retry.attempts`", "`auth.callers[].tools`", "`policies.<tool>.breaker`"):
        assert must in keys
    cells = [re.split(r"(?<!\\)\|", row)[1:-1] for row in rows]
    undescribed = [c[0].strip() for c in cells if len(c) == 4 and not c[3].strip()]
    assert not undescribed, f"config fields without a description: {undescribed}"
    assert str(ROOT) not in configdoc.render(), "the page must not depend on where the checkout is"


def test_every_flag_of_the_service_is_in_the_configuration_reference() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    flags = set(re.findall(r"--[a-z][a-z-]+", out.getvalue())) - {"--help"}
    assert flags >= {"--listen", "--config", "--log-level"}
    page = configdoc.render()
    assert not [flag for flag in flags if f"`{flag} " not in page], flags


def _event_table(page: Path) -> list[str]:
    text = page.read_text()
    start = text.index("| event | when | key fields |")
    return text[start:].split("\n\n", 1)[0].splitlines()[2:]


def test_event_tables_name_every_event_of_the_contract_once() -> None:
    oneof = agent_pb2.AgentEvent.DESCRIPTOR.oneofs_by_name["event"]
    kinds = {field.name for field in oneof.fields}
    readme, events = _event_table(ROOT / "README.md"), _event_table(ROOT / "docs" / "events.md")
    assert readme == events, "README.md and docs/events.md show the same event table"
    named = [row.split("`")[1] for row in readme]
    assert sorted(named) == sorted(kinds)


def test_metrics_in_operations_are_the_ones_the_service_exports() -> None:
    supervisor = Supervisor(Config(), log_level="INFO")  # its own metrics, beside the workers', under --workers
    exported = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in (*REGISTRY.collect(), *supervisor.registry.collect())
        if family.name.startswith("agent_")
    }
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("## Metrics") : text.index("## Logs")]
    documented = set(re.findall(r"`(agent_[a-z_]+)", table))
    assert documented == exported


async def test_the_tool_example_in_tools_md_loads_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "tools.md").read_text()
    section = text[text.index("## Writing a tool") :]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "exchange_rate.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("exchange_rate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "exchange_rate", module)
    spec.loader.exec_module(module)

    tool = module.create(ToolConfig(data_dir=tmp_path))
    assert tool.name == "exchange_rate" and tool.policy.cache is not None
    assert (await tool.run(tool.validate({"base": "EUR", "quote": "USD"})))["rate"] == 1.08
    with pytest.raises(ToolError, match="no rate from EUR to JPY"):
        await tool.run(tool.validate({"base": "EUR", "quote": "JPY"}))
