"""search_documents: full-text search (SQLite FTS5, bm25 ranking) over the company's runbooks and policies,
streamed one match per chunk. The index is built on first use and rebuilt whenever the corpus changes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools.base import JSON, Tool, ToolConfig
from tools.policy import BreakerPolicy, CachePolicy, TimeoutPolicy, ToolPolicy

DEFAULT_CORPUS = Path(__file__).parent / "data" / "docs"

# A match in the title counts for more than one in the body; the path column is not indexed.
_RANK = "bm25(docs, 0.0, 5.0, 1.0)"
_WORD = re.compile(r"\w+")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", title="tools.search_documents options")

    corpus_dir: Path = Field(DEFAULT_CORPUS, description="Folder of Markdown documents (*.md, searched recursively)")
    index_path: Path | None = Field(None, description="FTS5 index file; default <data_dir>/documents.db")


class SearchInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the model made up is an error it reads, not ignored

    query: str = Field(
        min_length=1, max_length=500, description="Plain words to look for; no operators or quoting needed."
    )
    limit: int = Field(5, ge=1, le=50, description="Maximum number of matching documents to return.")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must contain at least one word")
        return value


def _match_expression(query: str) -> str:
    """Treat the input as plain words: each one quoted as an FTS5 string, so operators, parentheses and quotes in
    the user's text are searched for rather than parsed. Terms are OR-ed; bm25 ranks documents that match more
    of them first."""
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in _WORD.findall(query))


def _title(path: Path, text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ")


class SearchDocuments(Tool[SearchInput]):
    name: ClassVar[str] = "search_documents"
    description: ClassVar[str] = (
        "Full-text search over the company's internal documents: operational runbooks (carrier outage, delayed "
        "shipments, customs holds, warehouse system down, EDI failures, incident escalation), policies (refunds "
        "and service credits, damaged-goods claims, hazardous materials, data retention, invoice disputes) and "
        "guides (SLA definitions, carrier onboarding). Use it to find how a procedure works or what a policy "
        "says, then quote the document. Give a few plain keywords. Each match is "
        "{doc, title, snippet, score}, best first; [brackets] in the snippet mark the matched words and a "
        "higher score is a better match. No match gives an empty list."
    )
    Input: ClassVar[type[BaseModel]] = SearchInput
    streaming: ClassVar[bool] = True
    # The shipped documents change only with a release: the same query gets the same matches, so cache them.
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=10, mode="soft"),
        breaker=BreakerPolicy(scope="process"),  # an index on this pod's disk: its failures are this process's
        side_effects="none",
        cache=CachePolicy(ttl_s=300),
    )

    def __init__(self, config: ToolConfig) -> None:
        self._options = Options.model_validate(dict(config.options))
        self._corpus = self._options.corpus_dir
        if not self._corpus.is_dir():
            raise ValueError(f"tools.search_documents: corpus_dir {self._corpus} is not a folder")
        self._index = self._options.index_path or config.data_dir / "documents.db"
        self._lock = threading.Lock()

    async def stream(self, args: SearchInput) -> AsyncIterator[JSON]:
        for match in await asyncio.to_thread(self._search, args):
            yield match

    def _search(self, args: SearchInput) -> list[JSON]:
        expression = _match_expression(args.query)
        if not expression:
            return []
        self._ensure_index()
        with closing(sqlite3.connect(f"{self._index.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                f"SELECT path, title, snippet(docs, 2, '[', ']', '…', 16), {_RANK} AS rank "
                "FROM docs WHERE docs MATCH ? ORDER BY rank LIMIT ?",
                (expression, args.limit),
            ).fetchall()
        # bm25() is lower-is-better; negate it so the model reads a higher score as a better match.
        return [{"doc": p, "title": t, "snippet": s, "score": round(-r, 4)} for p, t, s, r in rows]

    def _files(self) -> list[Path]:
        return sorted(p for p in self._corpus.rglob("*.md") if p.is_file())

    def _corpus_hash(self, files: list[Path]) -> str:
        digest = hashlib.sha256()
        for path in files:
            data = path.read_bytes()
            digest.update(f"{path.relative_to(self._corpus).as_posix()}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    def _ensure_index(self) -> None:
        """Rebuild the index when it is missing or was built from different files. Hashing a small corpus on
        each search costs far less than the search; the lock keeps concurrent calls from building it twice."""
        with self._lock:
            files = self._files()
            wanted = self._corpus_hash(files)
            if self._indexed_hash() != wanted:
                self._build(files, wanted)

    def _indexed_hash(self) -> str | None:
        if not self._index.exists():
            return None
        try:
            with closing(sqlite3.connect(f"{self._index.resolve().as_uri()}?mode=ro", uri=True)) as conn:
                row = conn.execute("SELECT value FROM meta WHERE key = 'corpus_hash'").fetchone()
        except sqlite3.DatabaseError:
            return None  # an unreadable or foreign file: rebuild over it
        return str(row[0]) if row else None

    def _build(self, files: list[Path], corpus_hash: str) -> None:
        """Build in a temporary file and rename it into place, so readers (here or in another process) see either
        the old index or the complete new one."""
        self._index.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._index.parent, prefix=".documents-", suffix=".db")
        os.close(fd)
        try:
            with closing(sqlite3.connect(tmp_name)) as conn, conn:
                conn.execute(
                    "CREATE VIRTUAL TABLE docs USING fts5(path UNINDEXED, title, body, tokenize='porter unicode61')"
                )
                conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                for path in files:
                    text = path.read_text(encoding="utf-8", errors="replace")
                    rel = path.relative_to(self._corpus).as_posix()
                    conn.execute("INSERT INTO docs VALUES (?, ?, ?)", (rel, _title(path, text), text))
                conn.execute("INSERT INTO meta VALUES ('corpus_hash', ?)", (corpus_hash,))
            os.replace(tmp_name, self._index)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def create(config: ToolConfig) -> SearchDocuments:
    return SearchDocuments(config)
