"""Throughput of `ezo curate` against a plain per-document Python loop with the same thresholds.

The real FineWeb-2 web sample (../shared/data/ja-web-sample) is replicated to >= 50 MB of text in a temp dir
(ids made unique, 8 JSONL files so both workers have tasks). Ours: the whole chain (4 datatrove passes) with
1 and 2 workers, plus the per-core rate of the filter pass (read + normalize + filters + MinHash signatures).
Baseline: a straightforward loop over the same documents -- pure-Python character counting, Counter n-grams,
datasketch MinHash with the same 400 permutations over the same character 5-grams -- on a slice of the corpus.
The last line is the ratio of the two filtering + signature rates per core.

    nice .venv/bin/python bench/curate_bench.py [--mb 50] [--baseline-mb 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
import unicodedata
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "ja-web-sample" / "fineweb2_edu_ja_sample100.jsonl"


def build_corpus(folder: Path, target_mb: float, files: int = 8) -> tuple[list[Path], list[str]]:
    rows = [json.loads(line) for line in SAMPLE.open(encoding="utf-8")]
    size = sum(len(r["text"].encode()) for r in rows)
    copies = int(target_mb * 1e6 // size) + 1
    paths = [folder / f"web-{i:02d}.jsonl" for i in range(files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    texts = []
    for c in range(copies):
        for r in rows:
            handles[c % files].write(json.dumps({"id": f"{r['id']}#{c}", "text": r["text"]}, ensure_ascii=False) + "\n")
            texts.append(r["text"])
    for h in handles:
        h.close()
    return paths, texts


# ---------------------------------------------------------------- the naive baseline (same thresholds)

def naive_verdict(text: str, cfg, minhash_perm: int, seed: int) -> str | None:
    from datasketch import MinHash

    from ezoforge.curate.ja_filters import clean_lines, normalize

    f = cfg.filters
    text = normalize(text, cfg.normalize.keep)

    def classes(t):
        c = Counter()
        for ch in t:
            o = ord(ch)
            if ch.isspace():
                c["space"] += 1
            elif 0x3041 <= o <= 0x309F:
                c["hira"] += 1
            elif 0x30A0 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF:
                c["kata"] += 1
            elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x3005 <= o <= 0x3007 or 0xF900 <= o <= 0xFAFF:
                c["kanji"] += 1 if ch not in "縺繧繝" else 0
                c["moji"] += 1 if ch in "縺繧繝" else 0
            elif 0x3000 < o <= 0x303F or 0xFF01 <= o <= 0xFF60:
                c["punct"] += 1
            elif o == 0xFFFD or 0x80 <= o <= 0x9F or (0xC0 <= o <= 0xFF and o not in (0xD7, 0xF7)):
                c["moji"] += 1
        chars = len(t) - c["space"]
        return c, max(chars, 1)

    c, chars = classes(text)
    if c["moji"] / chars > f.mojibake.max_ratio:
        return "mojibake"
    if (c["hira"] + c["kata"] + c["kanji"] + c["punct"]) / chars < f.japanese.min_ratio:
        return "not_japanese"
    if c["hira"] / chars < f.kana.min_hiragana or c["kata"] / chars > f.kana.max_katakana:
        return "kana"
    text = clean_lines(text, cfg.normalize)
    c, chars = classes(text)
    if len(text) - c["space"] < f.length.min_chars or c["hira"] + c["kata"] + c["kanji"] + c["punct"] < f.length.min_ja_chars:
        return "too_short"
    sentences = [s.strip() for s in re.split(r"[。！？!?\n]+", text) if s.strip()]
    if not sentences or not f.sentences.min_avg <= sum(map(len, sentences)) / len(sentences) <= f.sentences.max_avg \
            or max(map(len, sentences)) > f.sentences.max_len:
        return "sentences"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if sum(ln.endswith(("…", "‥", "...", "・・・")) for ln in lines) / len(lines) > f.ellipsis.max_ratio:
        return "ellipsis"
    seen, dup, dup_chars = set(), 0, 0
    for ln in lines:
        if ln in seen:
            dup, dup_chars = dup + 1, dup_chars + len(ln)
        seen.add(ln)
    if dup / len(lines) > f.duplicates.max_lines or dup_chars / len(text) > f.duplicates.max_line_chars:
        return "duplicates"
    dense = re.sub(r"\s+", "", text)
    for n, limit in f.top_ngram.max_ratio.items():
        grams = Counter(dense[i:i + n] for i in range(len(dense) - n + 1))
        if grams and grams.most_common(1)[0][1] * n / len(dense) > limit:
            return "top_ngram"
    for n, limit in f.dup_ngram.max_ratio.items():
        first, covered = {}, [False] * len(dense)
        for i in range(len(dense) - n + 1):
            g = dense[i:i + n]
            if g in first:
                covered[i:i + n] = [True] * n
            else:
                first[g] = i
        if sum(covered) / len(dense) > limit:
            return "dup_ngram"
    terminal = ("。", "！", "？", "!", "?", "」", "』", "）", ")", "…", "‥", ".", '"', "'")
    if sum(ln.endswith(terminal) for ln in lines) / len(lines) < f.lines.min_punct_lines \
            or text.count("\n") / chars > f.lines.max_newline_ratio:
        return "lines"
    if sum(text.count(w) for w in f.stopwords.words) < f.stopwords.min_count:
        return "stopwords"
    if sum(len(m) for w in f.ng_words.words for m in re.findall(re.escape(w), text)) / len(text) > f.ng_words.max_ratio:
        return "ng_words"
    simple = unicodedata.normalize("NFKC", text).lower()
    mh = MinHash(num_perm=minhash_perm, seed=seed)
    mh.update_batch([simple[i:i + 5].encode() for i in range(max(1, len(simple) - 4))])
    return None


def run_baseline(texts: list[str], cfg) -> tuple[float, float, int, Counter]:
    """(wall seconds, CPU seconds, bytes, verdicts)."""
    reasons: Counter = Counter()
    perm = cfg.dedup.num_buckets * cfg.dedup.hashes_per_bucket
    start, cpu = time.perf_counter(), time.process_time()
    for t in texts:
        reasons[naive_verdict(t, cfg, perm, cfg.dedup.seed)] += 1
    return time.perf_counter() - start, time.process_time() - cpu, sum(len(t.encode()) for t in texts), reasons


def run_ours(files: list[Path], out: Path, workers: int) -> dict:
    from ezoforge.curate.run import run
    from ezoforge.stages import load_recipe

    recipe = load_recipe(None, [f"curate.workers={workers}"])
    return run(recipe, [str(p) for p in files], out)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--baseline-mb", type=float, default=4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from importlib.metadata import version

    from ezoforge.curate.settings import CurateConfig

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, load {os.getloadavg()[0]:.1f}); "
          f"python {platform.python_version()}, " + ", ".join(
              f"{p} {version(p)}" for p in ("datatrove", "numpy", "pyarrow", "mwparserfromhell", "datasketch")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, texts = build_corpus(tmp, args.mb)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"corpus: {len(texts)} documents, {mb:.1f} MB of text in {len(files)} files")
        results = {}
        for workers in (1, 2):
            load = os.getloadavg()[0]
            stats = run_ours(files, tmp / f"out-{workers}", workers)
            results[workers] = stats
            mb_in, wall = stats["bytes_in"] / 1e6, stats["seconds"]
            print(f"ours, {workers} worker(s) (load {load:.1f}): whole chain {wall:.1f} s wall = "
                  f"{stats['docs_in'] / wall:.0f} docs/s, {mb_in / wall:.2f} MB/s, {mb_in / wall / workers:.2f} MB/s per core; "
                  f"filter pass (read+filters+MinHash signatures) {stats['docs_in'] / stats['filter_cpu_seconds']:.0f} docs "
                  f"and {mb_in / stats['filter_cpu_seconds']:.2f} MB per CPU-second "
                  f"({mb_in / stats['filter_task_seconds']:.2f} MB per task wall-second); "
                  f"kept {stats['docs_out']}, removed {stats['removed_by_filter']}")
        print(f"speed-up 1 -> 2 workers (whole chain, wall): {results[1]['seconds'] / results[2]['seconds']:.2f}x")
        cfg = CurateConfig()
        sub = texts[: max(1, int(len(texts) * args.baseline_mb / mb))]
        wall, cpu, nbytes, reasons = run_baseline(sub, cfg)
        print(f"baseline (plain per-document loop, 1 core): {len(sub)} documents, {nbytes / 1e6:.1f} MB: "
              f"{len(sub) / cpu:.0f} docs and {nbytes / 1e6 / cpu:.2f} MB per CPU-second ({wall:.1f} s wall); "
              f"kept {reasons[None] / len(sub):.0%} (ours before dedup: "
              f"{(results[1]['docs_out'] + results[1]['removed_by_filter'].get('duplicate', 0)) / results[1]['docs_in']:.0%})")
        ours_rate = results[1]["bytes_in"] / 1e6 / results[1]["filter_cpu_seconds"]
        print(f"ratio (ours / baseline, filtering + MinHash signatures per CPU-second): {ours_rate / (nbytes / 1e6 / cpu):.1f}x")


if __name__ == "__main__":
    main()
