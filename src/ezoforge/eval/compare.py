"""`ezo eval compare`: eval runs side by side, each later run's grades paired with the first run's."""
from __future__ import annotations

from pathlib import Path

from ezoforge.errors import ConfigError, EzoError
from ezoforge.eval import eval_report, metrics
from ezoforge.eval.tasks import METRICS
from ezoforge.records import read_eval_report, read_judgements, write_json, write_text


def _load_run(folder: Path) -> tuple[dict, dict[str, float]]:
    """The report and each task's mean grade (over its samples x judgments x turns)."""
    path = folder / "report.json"
    if not path.is_file():
        raise EzoError(f"{folder}: no report.json (not an `ezo eval` output folder)")
    report = read_eval_report(path)
    per_task = metrics.task_grades(read_judgements(folder / "judgements.jsonl"))
    return report, {t: sum(g) / len(g) for t, g in per_task.items() if g}


def judge_identity(report: dict) -> str | None:
    """The judge as it answered (its reported model, else the name it was asked for) and the judge prompt."""
    judge = report.get("judge")
    if not judge:
        return None
    return f"{' + '.join(judge.get('served') or [judge['model']])} / {judge['prompt_version']}"


def compare(dirs: list[Path], out: Path | None = None, allow_different_judges: bool = False) -> dict:
    """Runs side by side; each later run's grades are paired with the first run's on the tasks both graded.

    Grades from different judges (as served) or judge prompts measure different things: ranking them is refused
    (ConfigError naming both) unless `allow_different_judges`, which marks the result and pairs none of them."""
    if len(dirs) < 2:
        raise EzoError("compare needs at least two eval folders")
    loaded = [(Path(d), *_load_run(Path(d))) for d in dirs]
    names = [d.name for d, _, _ in loaded]
    labels = names if len(set(names)) == len(names) else [str(d) for d, _, _ in loaded]
    judged = [(label, judge_identity(report)) for label, (_, report, _) in zip(labels, loaded) if report.get("judge")]
    differ = [(label, who) for label, who in judged if who != judged[0][1]]
    if differ and not allow_different_judges:
        raise ConfigError(f"{judged[0][0]} was judged by {judged[0][1]} but {differ[0][0]} by {differ[0][1]}: grades "
                          "from different judges or judge prompts cannot be ranked; pass --allow-different-judges "
                          "to show them side by side, marked and unpaired")
    (_, base, base_grades), notes, runs = loaded[0], [], []
    for label, (folder, report, grades) in zip(labels, loaded):
        judge = judge_identity(report)
        row = {"label": label, "dir": str(folder), "model": report["model"]["name"], "judge": judge,
               "protocol": _protocol_words(report),
               **{k: report.get(k) for k in ("status", "n_tasks", "n_scored", "n_failed", "mean_grade", "ci95",
                                             *(key for key in METRICS if key != "mean_grade"))}, "diff": None}
        if runs:
            shared = sorted(set(base_grades) & set(grades))
            if judge != runs[0]["judge"]:
                notes.append(f"{label}: judged by {judge}, the baseline by {runs[0]['judge']}: grades not paired")
            elif not shared:
                notes.append(f"{label}: no task graded in both this run and the baseline")
            else:
                d = metrics.paired_bootstrap([base_grades[t] for t in shared], [grades[t] for t in shared],
                                             base["bootstrap"]["samples"], base["bootstrap"]["seed"])
                row["diff"] = {**d, "diff": metrics.rounded(d["diff"]), "ci95": [metrics.rounded(x) for x in d["ci95"]],
                               "p_not_better": metrics.rounded(d["p_not_better"])}
        if report.get("status") in ("failed", "partial"):
            notes.append(f"{label}: {report['n_failed']} judgement(s) failed ({report['status']})")
        notes += [f"{label}: {n}" for n in (report.get("judge") or {}).get("notes", [])]
        runs.append(row)
    result = {"baseline": labels[0], "runs": runs, "notes": notes, "different_judges": bool(differ)}
    if out is not None:
        write_json(Path(out) / "compare.json", result)
        write_text(Path(out) / "compare.html", eval_report.compare_html(result))
    return result



def paired_diff(before: Path, after: Path) -> tuple[dict | None, list[str]]:
    """`after`'s mean grade minus `before`'s over the tasks both graded, with its paired bootstrap interval, and
    compare's notes. Evals judged by different judges are shown side by side, never paired: the diff is None."""
    result = compare([before, after], allow_different_judges=True)
    return result["runs"][1]["diff"], result["notes"]


def _protocol_words(report: dict) -> str | None:
    p = report.get("protocol")
    return f"{p['samples']}×{p['judgments']}" if p else None
