"""search_documents over the shipped corpus and over a corpus in tmp_path that the tests change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tools import ToolConfig
from tools.search_documents import SearchDocuments, create


@pytest.fixture
def shipped(tmp_path: Path) -> SearchDocuments:
    return create(ToolConfig(data_dir=tmp_path))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "runbooks").mkdir(parents=True)
    (root / "runbooks" / "forklift.md").write_text("# Forklift checks\n\nInspect the forks and brakes daily.\n")
    (root / "fire-drill.md").write_text("# Fire drill\n\nAssemble at the car park.\n")
    return root


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def search(tool: SearchDocuments, query: str, limit: int = 5) -> list[Any]:
    return [chunk async for chunk in tool.stream(tool.validate({"query": query, "limit": limit}))]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("carrier outage re-route bookings", "runbooks/carrier-outage.md"),
        ("lithium batteries dangerous goods declaration", "policies/hazardous-materials.md"),
        ("service credit for late delivery", "policies/refunds-and-credits.md"),
        ("GDPR deletion request", "policies/data-retention.md"),
        ("customs hold EORI", "runbooks/customs-hold.md"),
    ],
)
async def test_finds_the_expected_document_first(shipped: SearchDocuments, query: str, expected: str) -> None:
    matches = await search(shipped, query)
    assert matches[0]["doc"] == expected


async def test_streams_one_match_per_chunk_best_first(shipped: SearchDocuments, tmp_path: Path) -> None:
    assert shipped.streaming
    matches = await search(shipped, "shipment delayed carrier", limit=3)
    assert len(matches) == 3
    assert set(matches[0]) == {"doc", "title", "snippet", "score"}
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True)
    assert "[" in matches[0]["snippet"]
    assert (tmp_path / "documents.db").exists()
    # run() is the list of the chunks.
    args = shipped.validate({"query": "shipment delayed carrier", "limit": 3})
    assert await shipped.run(args) == matches


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("carrier AND OR ((", "carrier AND OR"),
        ('"unbalanced carrier outage', "unbalanced carrier outage"),
        ("NEAR(carrier outage, 2)", "NEAR carrier outage 2"),
        ("title:carrier* body:refund", "title carrier body refund"),
        ("^customs -hold +EORI", "customs hold EORI"),
        ("配送 ünïcødé ✈ customs", "配送 ünïcødé customs"),
        ("'; DROP TABLE docs; -- lithium", "DROP TABLE docs lithium"),
    ],
)
async def test_operators_quotes_and_punctuation_are_searched_as_plain_words(
    shipped: SearchDocuments, query: str, words: str
) -> None:
    # FTS5 syntax in the model's text (quotes, NEAR, column filters, prefix stars, unbalanced parentheses) is never
    # parsed: the matches are those of its words alone, and no syntax error reaches the model or the run.
    matches = await search(shipped, query)
    assert matches and matches == await search(shipped, words)


async def test_no_match_yields_nothing(shipped: SearchDocuments) -> None:
    assert await search(shipped, "xylophone") == []
    assert await search(shipped, "(( ))") == []
    assert await search(shipped, '^-+ * : " ()') == []  # no word at all


def test_input_rules(shipped: SearchDocuments) -> None:
    for bad in ({"query": ""}, {"query": "   "}, {"query": "x" * 501}, {"query": "x", "limit": 51}):
        with pytest.raises(ValidationError):
            shipped.validate(bad)
    properties = shipped.input_schema()["properties"]
    assert properties["query"]["maxLength"] == 500 and properties["limit"]["maximum"] == 50


async def test_index_is_rebuilt_when_the_corpus_changes(tmp_path: Path, corpus: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"corpus_dir": str(corpus)}))
    assert [m["doc"] for m in await search(tool, "brakes")] == ["runbooks/forklift.md"]
    assert await search(tool, "sprinkler") == []

    (corpus / "fire-drill.md").write_text("# Fire drill\n\nTest the sprinkler valves monthly.\n")
    assert [m["doc"] for m in await search(tool, "sprinkler")] == ["fire-drill.md"]

    # A fresh instance (another process, a restart) sees the same current index.
    (corpus / "runbooks" / "dock.md").write_text("# Dock doors\n\nCheck the sprinkler heads above dock 4.\n")
    again = create(ToolConfig(data_dir=tmp_path, options={"corpus_dir": str(corpus)}))
    assert {m["doc"] for m in await search(again, "sprinkler")} == {"fire-drill.md", "runbooks/dock.md"}
    assert file_names(tmp_path) == ["corpus", "documents.db"]


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="corpus"):
        create(ToolConfig(data_dir=tmp_path, options={"corpus": "x"}))
    with pytest.raises(ValueError, match="not a folder"):
        create(ToolConfig(data_dir=tmp_path, options={"corpus_dir": str(tmp_path / "missing")}))
