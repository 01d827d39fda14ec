"""Parquet writers for kept and rejected documents, as datatrove blocks.

A task's file is streamed under a temporary name and renamed only when the task's stream ends cleanly, so
a killed run never leaves a partial file under a final name; the rerun task writes the same file again.
One writer can be shared by several filters as their `exclusion_writer` (it counts how often it is entered).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from ezoforge import records
from ezoforge.records import atomic_path

# Metadata the readers and filters set that is not a filter score.
_FIELDS = ("source", "title", "url")
_NOT_SCORES = frozenset({*_FIELDS, "raw_text", "malformed", "filter_reason", "filter_detail"})

REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                             ("title", pa.string()), ("url", pa.string()), ("reason", pa.string()),
                             ("detail", pa.string()), ("input", pa.string()), ("pos", pa.int64())])


def kept_row(doc: Document) -> dict[str, Any]:
    """The `Document` record (records.py): id, text, source, title, url, meta (input file, position, scores)."""
    md = doc.metadata
    meta = {k: v for k, v in md.items() if k not in _NOT_SCORES}
    return records.Document(id=doc.id, text=doc.text, **{k: md.get(k) for k in _FIELDS}, meta=meta).model_dump()


def kept_schema(row: dict[str, Any]) -> pa.Schema:
    meta = [(k, pa.string() if isinstance(v, str) else pa.int64() if isinstance(v, int) else pa.float64())
            for k, v in row["meta"].items()]
    return pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("title", pa.string()),
                      ("url", pa.string()), ("meta", pa.struct(meta))])


def rejected_row(doc: Document, reason: str) -> dict[str, Any]:
    md = doc.metadata
    return {"id": doc.id, "text": md.get("raw_text", doc.text), **{k: md.get(k) for k in _FIELDS},
            "reason": md.get("filter_reason", reason), "detail": md.get("malformed", md.get("filter_detail")),
            "input": md.get("input"), "pos": md.get("pos")}


def document_from_row(row: dict[str, Any]) -> Document:
    """Rebuild a pipeline document from a kept row (the inverse of kept_row)."""
    return Document(text=row["text"], id=row["id"], metadata={**{k: row[k] for k in _FIELDS}, **row["meta"]})


class ParquetSink(PipelineStep):
    """Writes `folder/{rank:05d}{suffix}.parquet`; as a pipeline step it writes every document, and passes
    it on when `passthrough`; as an exclusion writer it records rejected documents with their reason."""

    type = "💽 - WRITER"
    name = "📒 Parquet (atomic)"

    def __init__(self, folder: str, suffix: str = "", rejected_reason: str | None = None,
                 passthrough: bool = False, batch_size: int = 500):
        super().__init__()
        self.folder = folder
        self.suffix = suffix
        self.rejected_reason = rejected_reason  # None: kept documents
        self.passthrough = passthrough
        self.batch_size = batch_size
        self._depth = 0
        self._rows: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self):
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        self._depth -= 1
        if self._depth == 0 and self._stack is not None:
            if exc_type is None:
                self._flush()
            self._writer.close()
            stack, self._stack, self._writer = self._stack, None, None
            stack.__exit__(exc_type, exc, tb)  # renames the finished file, or deletes it after an error
        return False

    def write(self, doc: Document, rank: int = 0) -> None:
        row = kept_row(doc) if self.rejected_reason is None else rejected_row(doc, self.rejected_reason)
        if self._stack is None:
            schema = kept_schema(row) if self.rejected_reason is None else REJECTED_SCHEMA
            self._stack = contextlib.ExitStack()
            tmp = self._stack.enter_context(atomic_path(Path(self.folder) / f"{rank:05d}{self.suffix}.parquet"))
            self._writer = pq.ParquetWriter(tmp, schema)
        self._rows.append(row)
        if len(self._rows) >= self.batch_size:
            self._flush()
        self.stat_update("written")

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._rows, schema=self._writer.schema))
            self._rows = []

    def run(self, data, rank: int = 0, world_size: int = 1):
        with self:
            for doc in data:
                self.write(doc, rank)
                if self.passthrough:
                    yield doc


class KeptReader(PipelineStep):
    """Reads back the task's kept documents from the first pass (same order, so MinHash indices line up)."""

    type = "📖 - READER"
    name = "📒 kept documents"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        path = Path(self.folder) / f"{rank:05d}.parquet"
        if not path.exists():  # every document of this shard was filtered out
            return
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield document_from_row(row)
