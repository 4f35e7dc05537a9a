"""The docs stay true to the code, offline: docs/configuration.md is what the config models make."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from service import configdoc
from service.__main__ import parse_args

ROOT = Path(__file__).resolve().parent.parent


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
