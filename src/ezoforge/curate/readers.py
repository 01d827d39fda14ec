"""Input readers: MediaWiki XML exports (.xml, .xml.bz2), Parquet (FineWeb) and JSONL (.jsonl, .jsonl.gz).

Each input file is one or more shards: a file bigger than `split_mb` is read by several tasks, each taking
every k-th document (so one huge Wikipedia dump still keeps all workers busy). A document's position in its
file (`pos`) is its identity for resuming and for "first in input order" during deduplication.

Bad input names FILE:LINE: a malformed JSONL line or row fails the run, or with on_error="skip" becomes a
document marked `malformed` that the first filter sends to rejected/. Whole-file problems (missing, empty,
truncated or corrupt compression, malformed XML) always fail.
"""
from __future__ import annotations

import bz2
import gzip
import json
import math
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from ezoforge.curate.wikitext import DROP_NAMESPACES, wikitext_to_text
from ezoforge.errors import RecordError
from ezoforge.records import corpus_suffix, require, write_json


@dataclass(frozen=True)
class Shard:
    path: str
    file_index: int
    part: int
    parts: int

    def owns(self, pos: int) -> bool:
        return pos % self.parts == self.part


def plan_shards(files: list[Path], split_mb: float, limit: int | None = None) -> list[Shard]:
    """One task per shard, in input order; the plan depends only on the files, split_mb and limit (a file read up to
    its first `limit` documents is one shard: its first documents are one task's)."""
    shards = []
    for i, path in enumerate(files):
        corpus_suffix(path)
        if not path.is_file():
            raise RecordError(f"{path}: no such file")
        size = path.stat().st_size
        if size == 0:
            raise RecordError(f"{path}: empty file")
        parts = 1 if limit else max(1, math.ceil(size / (split_mb * 2**20)))
        shards.extend(Shard(str(path), i, p, parts) for p in range(parts))
    return shards


def _open(path: Path):
    if path.name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _doc(shard: Shard, pos: int, text: str, doc_id: str | None, source: str, **extra) -> Document:
    name = Path(shard.path).name
    meta = {"source": source, "title": extra.get("title"), "url": extra.get("url"), "input": name, "pos": pos,
            "raw_text": text}
    if "malformed" in extra:
        meta["malformed"] = extra["malformed"]
    return Document(text=text, id=doc_id if doc_id is not None else f"{name}:{pos}", metadata=meta)


# ---------------------------------------------------------------- JSONL

def read_jsonl(shard: Shard, on_error: str) -> Iterator[Document]:
    path = Path(shard.path)
    lineno = 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not shard.owns(lineno) or not raw.strip():
                    continue
                try:
                    row = _parse_line(path, lineno, raw)
                    text = require(path, lineno, row, "text")
                except RecordError as e:
                    if on_error != "skip":
                        raise
                    yield _doc(shard, lineno, raw.decode("utf-8", "replace").rstrip("\n"), None, "jsonl",
                               malformed=str(e))
                    continue
                doc_id = row.get("id")
                yield _doc(shard, lineno, text, None if doc_id is None else str(doc_id), "jsonl", url=row.get("url"),
                           title=row.get("title"))
    except (EOFError, OSError) as e:
        raise RecordError(f"{path}:{lineno + 1}: truncated or corrupt compressed file ({e})") from None
    if lineno == 0:
        raise RecordError(f"{path}: no lines (empty after decompression)")


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
            from None
    try:
        row = json.loads(line)
    except ValueError as e:
        raise RecordError(f"{path}:{lineno}: invalid JSON: {e}") from None
    if not isinstance(row, dict):
        raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


# ---------------------------------------------------------------- Parquet

def read_parquet(shard: Shard, on_error: str) -> Iterator[Document]:
    path = Path(shard.path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise RecordError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise RecordError(f"{path}: no 'text' column (columns: {', '.join(names)})")
    columns = [c for c in ("text", "id", "url", "title") if c in names]
    if pf.metadata.num_rows == 0:
        raise RecordError(f"{path}: no rows")
    pos = 0
    for batch in pf.iter_batches(columns=columns):
        for row in batch.to_pylist():
            pos += 1
            if not shard.owns(pos):
                continue
            try:
                text = require(path, pos, row, "text")
            except RecordError as e:
                if on_error != "skip":
                    raise
                yield _doc(shard, pos, "", None, "fineweb", malformed=str(e))
                continue
            doc_id = row.get("id")
            yield _doc(shard, pos, text, None if doc_id is None else str(doc_id), "fineweb", url=row.get("url"),
                       title=row.get("title"))


# ---------------------------------------------------------------- MediaWiki XML

def read_wiki(shard: Shard, skipped: Counter) -> Iterator[Document]:
    """Main-namespace, non-redirect pages, streamed page by page (memory stays flat on a whole dump)."""
    path = Path(shard.path)
    pages = 0
    try:
        with _open(path) as f:
            events = ET.iterparse(f, events=("start", "end"))
            _, root = next(events)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            drop_ns, url_base = DROP_NAMESPACES, None
            for event, elem in events:
                if event != "end":
                    continue
                if elem.tag == ns + "siteinfo":
                    drop_ns, url_base = _siteinfo(elem, ns)
                elif elem.tag == ns + "page":
                    pages += 1
                    if shard.owns(pages):
                        doc = _page(shard, pages, elem, ns, drop_ns, url_base, skipped)
                        if doc is not None:
                            yield doc
                    root.clear()  # drop finished pages: the tree would otherwise hold the whole dump
    except ET.ParseError as e:
        line = e.position[0] if e.position else 0
        raise RecordError(f"{path}:{line}: malformed XML or not UTF-8 ({e})") from None
    except (EOFError, OSError) as e:
        raise RecordError(f"{path}: truncated or corrupt compressed file ({e})") from None
    if pages == 0:
        raise RecordError(f"{path}: no <page> elements (is it a MediaWiki XML export?)")


def _siteinfo(elem: ET.Element, ns: str) -> tuple[frozenset[str], str | None]:
    local = {(n.text or "").strip().lower() for n in elem.iter(ns + "namespace") if n.get("key") in ("-2", "6", "14")}
    base = elem.findtext(ns + "base")
    url_base = unquote(base.rsplit("/", 1)[0]) + "/" if base and "/" in base else None
    return DROP_NAMESPACES | (local - {""}), url_base


def _page(shard: Shard, pos: int, page: ET.Element, ns: str, drop_ns: frozenset[str], url_base: str | None,
          skipped: Counter) -> Document | None:
    if (page.findtext(ns + "ns") or "0").strip() != "0":
        skipped["not_main_namespace"] += 1
        return None
    wikitext = page.findtext(f"{ns}revision/{ns}text") or ""
    head = wikitext.lstrip()[:10].lower()
    if page.find(ns + "redirect") is not None or head.startswith(("#転送", "#redirect")):
        skipped["redirect"] += 1
        return None
    title = (page.findtext(ns + "title") or "").strip()
    url = url_base + quote(title.replace(" ", "_")) if url_base and title else None
    return _doc(shard, pos, wikitext_to_text(wikitext, drop_ns), page.findtext(ns + "id"), "wikipedia",
                title=title, url=url)


# ---------------------------------------------------------------- the datatrove block

class ShardReader(PipelineStep):
    """Reads the shard matching the task's rank; writes the shard's input counts to `stats_dir` when done,
    with the time the whole task took until then (reading, filtering and signatures happen as it reads)."""

    type = "📖 - READER"
    name = "📚 wiki / parquet / jsonl"

    def __init__(self, shards: list[Shard], stats_dir: str, on_error: str = "fail", limit: int | None = None):
        super().__init__()
        self.shards = shards
        self.stats_dir = stats_dir
        self.on_error = on_error
        self.limit = limit  # documents read from each shard (None: all)

    def documents(self, shard: Shard, skipped: Counter) -> Iterator[Document]:
        kind = corpus_suffix(shard.path)
        if kind.startswith(".xml"):
            return read_wiki(shard, skipped)
        if kind == ".parquet":
            return read_parquet(shard, self.on_error)
        return read_jsonl(shard, self.on_error)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        shard = self.shards[rank]
        skipped: Counter = Counter()
        docs = nbytes = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for doc in self.documents(shard, skipped):
            if docs == self.limit:  # the rest of the file is never read (a compressed dump is not decompressed)
                break
            docs += 1
            nbytes += len(doc.text.encode("utf-8"))
            self.stat_update("documents")
            yield doc
        write_json(Path(self.stats_dir) / f"{rank:05d}.json",
                   {"docs_in": docs, "bytes_in": nbytes, "pages_skipped": dict(skipped),
                    "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start})


class DropMalformed(BaseFilter):
    """Sends the rows a reader could not parse (on_error="skip") to rejected/ with reason `malformed`."""

    name = "🧯 malformed rows"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return (False, "malformed") if "malformed" in doc.metadata else True
