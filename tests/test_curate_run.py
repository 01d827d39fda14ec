"""`ezo curate` end to end on real Japanese text: outputs, dedup in input order, kill-and-resume, no-op rerun,
config changes refused, and clear errors for bad input."""
import gzip
import json
import re
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ezo_in_process, run_slurm_array, stand_in_slurm
from ezoforge.config import bundled_data
from ezoforge.curate.readers import Shard, read_wiki
from ezoforge.curate.run import run
from ezoforge.errors import ConfigError, EzoError, MachineFault, RecordError
from ezoforge.executors import completed
from ezoforge.records import Document
from ezoforge.stages import load_recipe
from test_curate_wiki import _page, export

ENGLISH = "Lake Biwa is the largest freshwater lake in Japan, located in Shiga Prefecture. " * 8


WIKI = bundled_data("bundled:wiki/jawiki-demo-pages-articles.xml")
WEB = bundled_data("bundled:web/fineweb-demo.parquet")


def articles(n: int) -> list[str]:
    """The plain text of the package's demo Wikipedia articles; the first n of at least 400 characters."""
    texts = [d.text for d in read_wiki(Shard(WIKI, 0, 0, 1), Counter())]
    return [t for t in texts if len(t) >= 400][:n]


def near_copy(text: str) -> str:
    """The same article with the end of one sentence reworded (character 5-gram Jaccard about 0.97)."""
    sentences = text.split("。")
    sentences[1] = sentences[1][:-8] + "ここだけを書き換えた"
    return "。".join(sentences)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(*overrides: str):
    return load_recipe(None, list(overrides))


def tables(out: Path) -> dict[str, list[dict]]:
    """Every output shard's rows, by relative path."""
    return {str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(out.glob("*/*.parquet"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three inputs (JSONL, Parquet, MediaWiki XML) with planted copies and junk; what must come out."""
    arts = articles(9)
    root = tmp_path_factory.mktemp("corpus")
    web = write_jsonl(root / "web.jsonl", [
        *({"id": f"a{i}", "text": arts[i]} for i in range(5)),
        {"id": "english", "text": ENGLISH},
        {"id": "copy-a0", "text": arts[0]},  # exact copy, later in input order
        {"text": near_copy(arts[1])},  # no id: one is derived from the file name and line
    ])
    fineweb = root / "fineweb.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": "a5", "text": arts[5], "url": "https://example.jp/a5"},
        {"id": "copy-a2", "text": "  " + arts[2].replace("。", "。\n"), "url": "https://example.jp/copy"},
        {"id": "a6", "text": arts[6], "url": "https://example.jp/a6"},
    ]), fineweb)
    wiki = root / "jawiki.xml"
    wiki.write_text(export([_page("湖", 0, 7, arts[7]), _page("転送", 0, 8, "#転送 [[湖]]"),
                            _page("短い", 0, 9, "短い記事。")]), encoding="utf-8")
    expected_kept = {"a0", "a1", "a2", "a3", "a4", "a5", "a6", "7"}
    expected_rejected = {"english": "not_japanese", "copy-a0": "duplicate", "web.jsonl:8": "duplicate",
                         "copy-a2": "duplicate", "9": "too_short"}
    return [str(web), str(fineweb), str(wiki)], expected_kept, expected_rejected


@pytest.fixture(scope="module")
def curated(corpus, tmp_path_factory):
    inputs, _, _ = corpus
    out = tmp_path_factory.mktemp("curated") / "out"
    return out, run(recipe(), inputs, out)


def test_end_to_end_outputs(corpus, curated):
    _, kept_ids, rejected_ids = corpus
    out, stats = curated
    kept = [r for rows in tables(out).values() for r in rows if "reason" not in r]
    rejected = {r["id"]: r["reason"] for p, rows in tables(out).items() if p.startswith("rejected/") for r in rows}
    assert {r["id"] for r in kept} == kept_ids
    assert rejected == rejected_ids
    for row in kept:  # kept rows are the Document record the next stage reads
        doc = Document.model_validate(row)
        assert doc.meta["hiragana_ratio"] >= 0.2 and doc.meta["input"] and doc.meta["pos"] >= 1
    by_id = {r["id"]: r for r in kept}
    assert by_id["a5"]["source"] == "fineweb" and by_id["a5"]["url"] == "https://example.jp/a5"
    assert by_id["7"]["source"] == "wikipedia" and by_id["7"]["title"] == "湖"
    assert stats["docs_in"] == len(kept_ids) + len(rejected_ids) == stats["docs_out"] + sum(stats["removed_by_filter"].values())
    assert stats["removed_by_filter"] == {"duplicate": 3, "not_japanese": 1, "too_short": 1}
    assert stats["pages_skipped"] == {"redirect": 1}
    assert 0 < stats["bytes_out"] < stats["bytes_in"] and stats["docs_per_s"] > 0
    assert json.loads((out / "stats.json").read_text()) == stats
    assert (out / "filters.png").read_bytes()[:4] == b"\x89PNG"
    assert "split_mb" in (out / "config.yaml").read_text()
    assert not (out / ".work").exists()
    assert max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()) == (out / "DONE").stat().st_mtime_ns


def test_rerun_is_a_noop_and_other_settings_are_refused(corpus, curated):
    inputs, _, _ = corpus
    out, stats = curated
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run(recipe(), inputs, out) == stats
    assert run(recipe("curate.workers=2"), inputs, out) == stats  # how it runs is not what it makes
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ConfigError, match=r"curate.dedup.seed: 1 → 7; curate.filters.length.min_chars: 400 → 300"):
        run(recipe("curate.filters.length.min_chars=300", "curate.dedup.seed=7"), inputs, out)


def test_force_redoes_with_new_settings(corpus, tmp_path):
    inputs, _, _ = corpus
    out = tmp_path / "out"
    first = run(recipe("curate.dedup.enabled=false"), inputs, out)
    assert first["removed_by_filter"] == {"not_japanese": 1, "too_short": 1}  # copies stay without dedup
    stats = run(recipe("curate.dedup.enabled=false", "curate.filters.length.enabled=false"), inputs, out, force=True)
    assert "too_short" not in stats["removed_by_filter"]
    assert len(tables(out)["rejected/00000-filter.parquet"]) == 1  # the first run's files are gone


def test_first_in_input_order_survives_when_shards_interleave(tmp_path):
    """With a file read as 4 strided shards, line n belongs to task n % 4: the copies on lines 8 and 9 sit in
    earlier tasks (0, 1) than their original on line 7 (task 3), yet the original is the one kept."""
    arts = articles(10)
    rows = [{"id": f"a{i}", "text": t} for i, t in enumerate(arts)]
    rows[7:7] = [{"id": "copy-a6", "text": arts[6]}, {"id": "near-a6", "text": near_copy(arts[6])}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    split_mb = path.stat().st_size / 3.5 / 2**20  # -> 4 shards
    stats = run(recipe(f"curate.split_mb={split_mb}"), [str(path)], tmp_path / "out")
    assert stats["tasks"] == 4
    rejected = {r["id"]: r["reason"] for rows in tables(tmp_path / "out").values() for r in rows if "reason" in r}
    assert rejected == {"copy-a6": "duplicate", "near-a6": "duplicate"}


def test_kill_and_resume_gives_identical_outputs(tmp_path):
    inputs = [WIKI, WEB]
    settings = ["--set", "curate.split_mb=0.02"]  # the 127 KiB wiki and 48 KiB web files as 10 tasks
    reference = tmp_path / "reference"
    tasks = run(recipe("curate.split_mb=0.02"), inputs, reference)["tasks"]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ezoforge", "curate", *inputs, "--out", str(out), *settings]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while completed(out / ".work" / "logs" / "filter") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE").exists() and 3 <= completed(out / ".work" / "logs" / "filter") < tasks, "the kill must land mid-run"
    for path in out.glob("*/*.parquet"):  # whatever is under a final name is complete
        pq.read_table(path)

    resumed = ezo_in_process(*cmd[3:])  # the same command, resumed in this process
    assert resumed.returncode == 0, resumed.stderr
    assert tables(out) == tables(reference)
    assert not list(out.glob("*/.*.tmp"))


def test_malformed_jsonl_line_fails_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "一行目"}\n\n{"text": "三行目", \n', encoding="utf-8")
    result = ezo_in_process("curate", path, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert f"{path}:3: invalid JSON" in " ".join(result.stderr.split())


def test_malformed_rows_with_skip_go_to_rejected(tmp_path):
    arts = articles(2)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b"".join([
        json.dumps({"id": "ok", "text": arts[0]}, ensure_ascii=False).encode() + b"\n",
        b'{"id": "broken", "text": \n',
        json.dumps({"id": "no-text", "body": "本文"}).encode() + b"\n",
        b'{"id": "latin1", "text": "caf\xe9"}\n',
    ]))
    table = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "null-text", "text": None}, {"id": "ok2", "text": arts[1]}]), table)
    stats = run(recipe("curate.on_error=skip"), [str(jsonl), str(table)], tmp_path / "out")
    rejected = [r for p, rows in tables(tmp_path / "out").items() if p.startswith("rejected/") for r in rows]
    assert stats["removed_by_filter"] == {"malformed": 4} and stats["docs_out"] == 2
    details = sorted(r["detail"] for r in rejected)
    assert details == sorted([f"{jsonl}:2: invalid JSON: Expecting value: line 1 column 26 (char 25)",
                              f"{jsonl}:3: missing field 'text'",
                              f"{jsonl}:4: not valid UTF-8 (byte 0xe9 at column 30)",
                              f"{table}:1: missing field 'text'"])
    assert {r["text"] for r in rejected if r["id"] == "in.jsonl:2"} == {'{"id": "broken", "text": '}


def test_bad_files_give_clear_errors(tmp_path):
    text = json.dumps({"text": "日本語の文章です。" * 100}, ensure_ascii=False) + "\n"
    packed = gzip.compress(text.encode() * 200)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "sjis.jsonl").write_bytes(text.encode() + '{"text": "日本語"}\n'.encode("cp932"))
    (tmp_path / "table.csv").write_text("text\n本文\n")
    cases = {
        "cut.jsonl.gz": r"cut\.jsonl\.gz:\d+: truncated or corrupt compressed file",
        "empty.jsonl": r"empty\.jsonl: empty file",
        "sjis.jsonl": r"sjis\.jsonl:2: not valid UTF-8",
        "table.csv": r"table\.csv: unsupported input type",
        "missing.jsonl": r"missing\.jsonl: no such file",
        "nothing-*.jsonl": r"nothing-\*\.jsonl: no input files match",
    }
    for name, message in cases.items():
        with pytest.raises(RecordError, match=message):
            run(recipe(), [str(tmp_path / name)], tmp_path / f"out-{name}")


def test_lsh_catches_jaccard_09_pairs_at_the_swallow_rate(tmp_path):
    """20 bands x 20 rows: a pair at Jaccard 0.9 shares a band with probability 1-(1-0.9^20)^20 = 0.925;
    at 0.5 almost never. Each min-hash agrees with probability close to the Jaccard similarity."""
    import numpy as np

    from ezoforge.curate.dedup import CharMinhashSignature, minhash_config
    from ezoforge.curate.settings import DedupConfig

    sig = CharMinhashSignature(str(tmp_path), minhash_config(DedupConfig()))
    rng = np.random.default_rng(0)

    def pair_stats(jaccard: float, pairs: int = 300) -> tuple[float, float]:
        caught, agree = 0, []
        for _ in range(pairs):
            values = rng.choice(2**32, size=1000, replace=False).astype(np.uint32)  # the union
            common, own = int(1000 * jaccard), (1000 - int(1000 * jaccard)) // 2
            a, b = values[:common + own], np.concatenate([values[:common], values[common + own:]])
            sa, sb = sig.get_signature(a.reshape(-1, 1)), sig.get_signature(b.reshape(-1, 1))
            caught += any(x == y for x, y in zip(sa, sb))
            agree.append(np.mean(np.concatenate(sa) == np.concatenate(sb)))
        return caught / pairs, float(np.mean(agree))

    caught, agree = pair_stats(0.9)
    assert caught >= 0.88 and abs(agree - 0.9) < 0.02, (caught, agree)
    caught, agree = pair_stats(0.5, 100)
    assert caught == 0 and abs(agree - 0.5) < 0.03, (caught, agree)


def test_slurm_executor_submits_dependent_passes_that_finish_the_same(corpus, curated, tmp_path, monkeypatch):
    """`executor: slurm` submits the four passes as dependent job arrays (stand-in sbatch/scontrol scripts);
    running each array task as Slurm would, then the same command again, gives the local run's output."""
    log = stand_in_slurm(tmp_path, monkeypatch)
    inputs, _, _ = corpus
    out = tmp_path / "out"
    slurm = recipe("curate.executor.kind=slurm", "curate.executor.partition=cpu", "curate.workers=4")
    if Path("/dev/shm").is_dir():  # a node's own memory: tasks on other nodes could not write there
        with pytest.raises(ConfigError, match="tmpfs, this node's memory"):
            run(slurm, inputs, Path(tempfile.mkdtemp(dir="/dev/shm")) / "out")
    with pytest.raises(EzoError, match=r"submitted the curate passes to Slurm as jobs (\d+, ){3}\d+ ") as submitted:
        run(slurm, inputs, out)
    jobs = re.search(r"jobs ((\d+, ){3}\d+)", str(submitted.value)).group(1)
    arrays = [line for line in log.read_text().splitlines() if "RUN_OFFSET" in line]
    assert len(arrays) == 4 and "--dependency" not in arrays[0]
    assert all("--dependency=afterok:" in line for line in arrays[1:])
    # The jobs hold the folder after the command has exited: a forced redo is refused, naming them.
    with pytest.raises(MachineFault, match=f"Slurm jobs {jobs} still write into it; rerun without --force"):
        run(slurm, inputs, out, force=True)

    for name in ("filter", "buckets", "cluster", "dedup"):
        run_slurm_array(out / ".work" / "logs" / name, monkeypatch)
    stats = run(slurm, inputs, out)
    assert len([line for line in log.read_text().splitlines() if "RUN_OFFSET" in line]) == 4  # nothing resubmitted
    assert tables(out) == tables(curated[0]) and stats["docs_out"] == curated[1]["docs_out"]
    assert not (tmp_path / ".out.held").exists()  # collected: the folder is free again
