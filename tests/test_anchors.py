"""Published figures beside a run: only those graded by the judge version that graded the run, on one scale only
when the scales are affine images of each other, and a plain sentence when there is none or the judge is local."""
import csv
import json
import os

import pytest

from ezoforge.errors import RecordError
from ezoforge.eval import anchors

OPENAI = "https://api.openai.com/v1"


def published(**match) -> list[dict]:
    """The anchors file read with csv alone (independent of anchors.load), filtered by exact field values."""
    with open(anchors.ANCHORS, encoding="utf-8", newline="") as f:
        return [r for r in csv.DictReader(f) if all(r[k] == v for k, v in match.items())]


def test_the_file_holds_sourced_figures_for_both_benchmarks_and_the_named_models():
    rows = anchors.load()
    assert len(rows) >= 12 and len(rows) == len(published())
    assert {a.benchmark for a in rows} == {"elyza100", "mt-bench-ja"}
    for a in rows:
        assert a.source.startswith("https://github.com/") and "/blob/" in a.source  # a pinned permalink
        assert a.judge and a.protocol and len(a.date) == 10
        lo, hi, _ = anchors.parse_scale(a.scale)
        assert lo <= a.score <= hi
    models = " ".join(a.model for a in rows)
    for name in ("gpt-4o-mini", "gpt-4o-2024-05-13", "Llama-3.1-70B-Instruct", "Llama-3.1-8B-Instruct", "Swallow"):
        assert name in models, name


def test_a_matching_judge_with_other_prompts_shows_its_figures_as_context_not_ranked():
    p = anchors.place("elyza100", {"model": "gpt-4o", "served": ["gpt-4o-2024-08-06"]}, 3.6)
    expected = published(benchmark="elyza100", judge="gpt-4o-2024-08-06")
    assert len(expected) >= 3 and not p["comparable"] and p["judge_from"] == "served"
    assert sorted((r["model"], r["score"]) for r in p["rows"]) == sorted((r["model"], float(r["score"]))
                                                                        for r in expected)
    assert all(r["context"] and r["shown"] is None for r in p["rows"])
    assert "other judge prompts (flexeval v0.10.1) than this run's (ezo-judge-ja-v1)" in p["statement"]
    table = anchors.ranked(p, [("ours", 3.6, "1 x 1")])
    assert table[0]["label"] == "ours" and all(item["shown"] is None for item in table[1:])
    md = "\n".join(anchors.markdown_section(anchors.beside([("ours", [p])])))
    assert "(context: flexeval v0.10.1 prompts, not ranked)" in md


def test_the_same_judge_and_prompt_set_ranks_the_run_among_the_figures():
    """The published rows as if graded with our prompt set: the run is put in rank among them."""
    ours = anchors.RUN_PROMPT_SETS["elyza100"]
    rows = [a if a.judge != "gpt-4o-2024-08-06" else anchors.Anchor(**{**a.__dict__, "prompt_set": ours})
            for a in anchors.load()]
    p = anchors.place("elyza100", {"model": "gpt-4o", "served": ["gpt-4o-2024-08-06"]}, 3.6, rows)
    assert p["comparable"] and f"the same judge prompts ({ours})" in p["statement"]
    table = anchors.ranked(p, [("ours", 3.6, "1 x 1")])
    scores = [item["shown"] for item in table]
    assert scores == sorted(scores, reverse=True)
    at = [item["label"] for item in table].index("ours")
    assert all(item["shown"] > 3.6 for item in table[:at]) and all(item["shown"] < 3.6 for item in table[at + 1:])
    assert "gpt-4o-2024-08-06 (as served)" in p["statement"]


def test_a_judge_with_no_published_figure_says_so_plainly():
    p = anchors.place("elyza100", {"model": "gpt-4.1-mini", "served": ["gpt-4.1-mini-2025-04-14"]}, 4.2)
    assert p["rows"] == [] and not p["comparable"]
    assert anchors.NONE_UNDER_JUDGE in p["statement"]
    page = anchors.html_section(anchors.beside([("ours", [p])]))
    assert anchors.NONE_UNDER_JUDGE in page and "<table" not in page
    # The same judge on the other benchmark: figures exist for one and not the other.
    mt = anchors.place("mt-bench-ja", {"model": "gpt-4o", "served": ["gpt-4o-2024-08-06"]}, 6.0)
    assert mt["rows"] and all(r["benchmark"] == "mt-bench-ja" for r in mt["rows"])


def test_the_configured_name_is_used_only_when_no_reply_reported_one():
    configured = anchors.place("elyza100", {"model": "gpt-4-turbo-preview", "served": []}, 3.9)
    assert configured["judge_from"] == "configured" and "as configured" in configured["statement"]
    assert len(configured["rows"]) == len(published(benchmark="elyza100", judge="gpt-4-turbo-preview"))
    # The dated version it answered as wins over the alias it was asked for.
    served = anchors.place("elyza100", {"model": "gpt-4-turbo-preview", "served": ["gpt-4-0125-preview"]}, 3.9)
    assert served["rows"] == [] and "gpt-4-0125-preview" in served["statement"]
    mixed = anchors.place("elyza100", {"model": "gpt-4o", "served": ["gpt-4o-2024-05-13", "gpt-4o-2024-08-06"]}, 3.9)
    assert mixed["rows"] == [] and anchors.NONE_UNDER_JUDGE in mixed["statement"] and "several" in mixed["statement"]


@pytest.mark.parametrize("judge", [
    {"model": "bundled:smollm2-135m-instruct", "url": "local", "served": ["bundled:smollm2-135m-instruct"]},
    {"model": "gpt-4o-2024-08-06", "url": "local", "served": ["gpt-4o-2024-08-06"]},  # a local model by that name
])
def test_a_local_judge_is_comparable_to_no_published_figure(judge):
    for p in anchors.for_report({"tasks": ["elyza100:x.jsonl", "mt-bench-ja:y.jsonl", "ppl:z.jsonl"],
                                 "by_suite": {"elyza100": {"mean_grade": 2.1}, "mt-bench-ja": {"mean_grade": 3.0}},
                                 "protocol": {"samples": 1, "judgments": 1}}, judge):
        assert p["rows"] == [] and "comparable to no published figure" in p["statement"]
        assert "comparable to no published figure" in "\n".join(anchors.markdown_section(anchors.beside([("t", [p])])))


def test_runs_under_different_judges_are_never_ranked_together():
    base = anchors.place("elyza100", {"model": "gpt-4o", "served": ["gpt-4o-2024-08-06"]}, 3.0)
    tuned = anchors.place("elyza100", {"model": "gpt-4-turbo", "served": ["gpt-4-turbo-preview"]}, 3.8)
    groups = anchors.beside([("base", [base]), ("tuned", [tuned])])
    assert [[label for label, _, _ in runs] for _, runs in groups] == [["base"], ["tuned"]]
    for p, runs in groups:
        assert {r["judge"] for r in p["rows"]} == {p["judge"]}
    same = anchors.beside([("base", [base]), ("tuned", [{**base, "score": 3.8}])])
    assert len(same) == 1 and [label for label, _, _ in same[0][1]] == ["base", "tuned"]
    text = "\n".join(anchors.markdown_section(same))
    assert text.index("**tuned**") < text.index("**base**")  # ranked by score: 3.8 above 3.0
    assert "gpt-4o-mini" not in text  # a gpt-4-turbo-preview figure never sits in a gpt-4o-2024-08-06 table


def test_scales_convert_only_when_affine_equivalent():
    assert anchors.convert(7.3, "1-10", "0.1-1.0") == pytest.approx(0.73)
    assert anchors.convert(0.655, "0.1-1.0", "1-10") == pytest.approx(6.55)
    assert anchors.convert(4.0, "1-5", "1-10") is None and anchors.convert(8.0, "1-10", "1-5") is None
    ours = anchors.RUN_PROMPT_SETS["mt-bench-ja"]
    rows = [anchors.Anchor("normalized", "mt-bench-ja", 0.655, "0.1-1.0", "j-1", ours, "5 x 1", "https://x", "2025-01-01"),
            anchors.Anchor("native", "mt-bench-ja", 6.2, "1-10", "j-1", ours, "1 x 1", "https://y", "2025-01-01"),
            anchors.Anchor("other rubric", "mt-bench-ja", 4.1, "1-5", "j-1", ours, "1 x 1", "https://z", "2025-01-01")]
    p = anchors.place("mt-bench-ja", {"model": "j", "served": ["j-1"]}, 6.4, rows)
    assert [(r["model"], r["shown"]) for r in p["rows"]] == [("normalized", 6.55), ("native", 6.2),
                                                             ("other rubric", None)]
    assert "Converted from 0.1-1.0" in p["statement"] and "1 on another scale" in p["statement"]
    md = "\n".join(anchors.markdown_section(anchors.beside([("ours", [p])])))
    assert "6.55 (published 0.655 on 0.1-1.0)" in md and "4.10 (on 1-5, not ranked)" in md
    assert md.index("normalized") < md.index("**ours**") < md.index("native") < md.index("other rubric")


def test_a_bad_row_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "anchors.csv"
    path.write_text(",".join(anchors.FIELDS) + "\n" + "m,elyza100,3.1,1-5,j,ps,p,https://s,2025-01-01,\n"
                    + "m,elyza100,,1-5,j,ps,p,https://s,2025-01-01,\n", encoding="utf-8")
    with pytest.raises(RecordError, match=f"{path}:3: missing field 'score'"):
        anchors.load(path)


def test_the_demo_eval_says_no_published_figure_in_every_report(demo_run):
    """The scripted judge answers as a model no source used: each report says so in the same words."""
    tuned = demo_run.workdir / "eval-tuned"
    report = json.loads((tuned / "report.json").read_text(encoding="utf-8"))
    [p] = report["anchors"]
    assert p["judge"] == report["judge"]["served"][0] and anchors.NONE_UNDER_JUDGE in p["statement"]
    for page in (tuned / "report.html", demo_run.workdir / "report.html"):
        assert anchors.NONE_UNDER_JUDGE in page.read_text(encoding="utf-8")
    assert anchors.NONE_UNDER_JUDGE in (demo_run.workdir / "export" / "README.md").read_text(encoding="utf-8")


def test_the_run_report_and_card_place_the_runs_beside_matching_figures(demo_copy):
    """The same records as if an OpenAI judge had answered as gpt-4o-2024-08-06: both runs in its table, the
    published figures (other judge prompts) as context below them."""
    from ezoforge.export.card import render
    from ezoforge.export.provenance import gather
    from ezoforge.recipe_report import write_run_report
    from ezoforge.stages import eval_folders

    workdir = demo_copy.workdir
    for side in ("base", "tuned"):
        path = workdir / f"eval-{side}" / "report.json"
        report = json.loads(path.read_text(encoding="utf-8"))
        report["judge"]["served"] = ["gpt-4o-2024-08-06"]
        report["mean_grade"] = {"base": 2.5, "tuned": 3.6}[side]
        report["anchors"] = anchors.for_report(report, {**report["judge"], "url": OPENAI})
        if side == "tuned":  # the copy's merged model (the card reads an eval of the model it describes only)
            report["model"]["spec"] = str(workdir / "merged")
        path.write_text(json.dumps(report), encoding="utf-8")
    write_run_report(workdir, [], {})
    page = (workdir / "report.html").read_text(encoding="utf-8")
    section = page[page.index("<h2>Beside published figures</h2>"):]
    section = section[: section.index("<h2>", 5)]
    names = [r["model"] for r in published(benchmark="elyza100", judge="gpt-4o-2024-08-06")]
    assert all(n in section for n in names) and "gpt-4o-mini" not in section
    # Graded with our prompts, not flexeval's: the runs are ranked between themselves, the figures shown as context.
    assert section.index("tuned: ") < section.index("base: ") < section.index("sarashina2.2-3b")
    assert "context: flexeval v0.10.1 prompts, not ranked" in section
    card = render(gather(workdir / "merged", eval_folders(workdir)), "t", "ref", None, {}, None, False)
    rows = [line for line in card.splitlines() if line.startswith("| ") and " | 1-5 | " in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows][:3] == [
        "**tuned**", "**base**", "sbintuitions/sarashina2.2-3b-instruct-v0.1"]
    assert rows[1].startswith("| **base** | 2.50 |") and "3.75 (context: flexeval v0.10.1 prompts" in rows[2]


SHABERI_LINES = [{"Question": "問1", "output": "正解1", "eval_aspect": "", "ModelAnswer": "回答1", "score": 4},
                 {"Question": "問2", "output": "正解2", "eval_aspect": "", "ModelAnswer": "回答2", "score": 5},
                 {"Question": "問3", "output": "正解3", "eval_aspect": "", "ModelAnswer": "回答3", "score": 2},
                 {"Question": "問4", "output": "正解4", "eval_aspect": "", "ModelAnswer": "回答4", "score": None}]


def test_anchor_rows_are_recomputed_from_files_in_shaberis_judgment_format(tmp_path):
    """A judgment file as shaberi publishes it, committed to a git repository here: the row is its mean grade,
    pinned to that commit, dated by it, with the judge version and prompt set; the committed rows carry the same."""
    import subprocess

    from bench.shaberi_anchors import JUDGES, rows_at

    folder = tmp_path / "shaberi" / "data" / "judgements" / "judge_gpt-4.1-2025-04-14" / "elyza__ELYZA-tasks-100"
    folder.mkdir(parents=True)
    (folder / "meta-llama__Llama-3.1-8B-Instruct.json").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in SHABERI_LINES), encoding="utf-8")
    repo = tmp_path / "shaberi"
    env = {"GIT_AUTHOR_DATE": "2025-07-03T12:00:00", "GIT_COMMITTER_DATE": "2025-07-03T12:00:00",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "judgements"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env={**os.environ, **env})
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    [row] = rows_at(repo, "HEAD")
    assert row == {"model": "meta-llama/Llama-3.1-8B-Instruct", "benchmark": "elyza100", "score": "3.67",
                   "scale": "1-5", "judge": "gpt-4.1-2025-04-14", "prompt_set": "shaberi",
                   "protocol": "1 sample x 1 judgment (shaberi)",
                   "source": f"https://github.com/shisa-ai/shaberi/blob/{commit}/data/judgements/judge_gpt-4.1-2025-04-14/"
                             "elyza__ELYZA-tasks-100/meta-llama__Llama-3.1-8B-Instruct.json",
                   "date": "2025-07-03", "note": "mean of the file's 3 grades (1 without a grade left out)"}
    # The committed rows: ELYZA-tasks-100 and Japanese MT-Bench under both of today's judges, for the named models.
    for judge, prompt_set in JUDGES.values():
        for benchmark in ("elyza100", "mt-bench-ja"):
            models = {r["model"] for r in published(judge=judge, benchmark=benchmark, prompt_set=prompt_set)}
            assert {"meta-llama/Llama-3.3-70B-Instruct", "shisa-ai/shisa-v2-llama3.3-70b", "Qwen/Qwen3-8B",
                    "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5"} <= models, (judge, benchmark)
            assert any(m.startswith("gpt-4o") for m in models)
