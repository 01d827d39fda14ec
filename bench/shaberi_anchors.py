"""Anchor rows (src/ezoforge/data/anchors.csv) under today's judges, recomputed from shaberi's published judgment files.

shaberi (github.com/shisa-ai/shaberi) keeps every judgment it made under `data/judgements/JUDGE/DATASET/MODEL.json`:
one JSON object per line with the model's answer and the judge's `score`. A row here is the mean of one file's
scores, pinned to the commit it was read at.

    python bench/shaberi_anchors.py --repo PATH_TO_SHABERI_GIT [--commit SHA]   # prints the rows
    python bench/shaberi_anchors.py --repo PATH --check                          # exits 1 unless anchors.csv has them

PATH may be a clone or a bare mirror: files are read with `git show COMMIT:PATH`, dates with `git log`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

ANCHORS = Path(__file__).resolve().parents[1] / "src" / "ezoforge" / "data" / "anchors.csv"
FIELDS = ("model", "benchmark", "score", "scale", "judge", "prompt_set", "protocol", "source", "date", "note")
# shaberi's dataset folder -> (our benchmark, its scale, the protocol in words)
DATASETS = {
    "elyza__ELYZA-tasks-100": ("elyza100", (1, 5), "1 sample x 1 judgment (shaberi)"),
    "shisa-ai__ja-mt-bench-1shot": ("mt-bench-ja", (1, 10), "1 sample x 1 judgment; first turn only (shaberi ja-mt-bench-1shot)"),
}
# The judge's folder -> its dated version and the prompt set its judgments used. shaberi moved to a new judge prompt
# with gpt-5.1 (it keeps the old prompt's gpt-5.1 runs apart, in `...-oldjudgeprompt`).
JUDGES = {
    "judge_gpt-4.1-2025-04-14": ("gpt-4.1-2025-04-14", "shaberi"),
    "judge_gpt-5.1-2025-11-13": ("gpt-5.1-2025-11-13", "shaberi-2025-11"),
}
# The models the recipes are compared with: Llama 3.1/3.3 Instruct, Swallow and shisa-v2 on Llama, gpt-4o, Qwen3.
MODELS = ("meta-llama__Llama-3.1-8B-Instruct", "meta-llama__Llama-3.3-70B-Instruct",
          "tokyotech-llm__Llama-3.1-Swallow-8B-Instruct-v0.5", "tokyotech-llm__Llama-3.3-Swallow-70B-Instruct-v0.4",
          "shisa-ai__shisa-v2-llama3.1-8b", "shisa-ai__shisa-v2-llama3.3-70b", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20",
          "Qwen__Qwen3-8B", "Qwen__Qwen3-30B-A3B-Instruct-2507")
REPO_URL = "https://github.com/shisa-ai/shaberi"


def model_name(stem: str) -> str:
    """shaberi's file name for a model -> its hub id (`org__name` -> `org/name`); API models keep their name."""
    return stem.replace("__", "/", 1)


def anchor_row(text: str, judge_folder: str, dataset: str, stem: str, commit: str, date: str) -> dict:
    """The anchor row of one judgment file's text (JSON lines with a `score`)."""
    benchmark, (low, high), protocol = DATASETS[dataset]
    judge, prompt_set = JUDGES[judge_folder]
    scores, ungraded = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            score = float(json.loads(line)["score"])
        except (ValueError, KeyError, TypeError):
            ungraded += 1
            continue
        if low <= score <= high:
            scores.append(score)
        else:
            ungraded += 1
    if not scores:
        raise ValueError(f"{judge_folder}/{dataset}/{stem}.json: no score in {low}-{high}")
    path = f"data/judgements/{judge_folder}/{dataset}/{stem}.json"
    note = f"mean of the file's {len(scores)} grades" + (f" ({ungraded} without a grade left out)" if ungraded else "")
    return {"model": model_name(stem), "benchmark": benchmark, "score": f"{sum(scores) / len(scores):.2f}",
            "scale": f"{low}-{high}", "judge": judge, "prompt_set": prompt_set, "protocol": protocol,
            "source": f"{REPO_URL}/blob/{commit}/{path}", "date": date, "note": note}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def rows_at(repo: Path, commit: str) -> list[dict]:
    commit = git(repo, "rev-parse", commit).strip()
    listed = set(git(repo, "ls-tree", "-r", "--name-only", commit, "data/judgements").splitlines())
    rows = []
    for judge_folder in JUDGES:
        for dataset in DATASETS:
            for stem in MODELS:
                path = f"data/judgements/{judge_folder}/{dataset}/{stem}.json"
                if path not in listed:
                    print(f"not published: {path}", file=sys.stderr)
                    continue
                date = git(repo, "log", "-1", "--format=%cs", commit, "--", path).strip()
                rows.append(anchor_row(git(repo, "show", f"{commit}:{path}"), judge_folder, dataset, stem, commit,
                                       date))
    return rows


def as_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writerows(rows)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, required=True, help="a shaberi git clone or mirror")
    ap.add_argument("--commit", default="HEAD")
    ap.add_argument("--check", action="store_true", help="exit 1 unless anchors.csv holds exactly these rows")
    args = ap.parse_args()
    rows = rows_at(args.repo, args.commit)
    if not args.check:
        print(as_csv(rows), end="")
        return
    with open(ANCHORS, encoding="utf-8", newline="") as f:
        committed = {tuple(r[k] for k in FIELDS) for r in csv.DictReader(f)}
    missing = [r for r in rows if tuple(r[k] for k in FIELDS) not in committed]
    for r in missing:
        print(f"not in {ANCHORS.name} as computed: {r['model']} {r['benchmark']} {r['judge']} {r['score']}")
    print(f"{len(rows) - len(missing)} of {len(rows)} rows reproduced")
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
