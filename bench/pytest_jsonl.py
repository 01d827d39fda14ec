"""A pytest plugin for bench/gpu_check.sh: one JSON line per test as it starts and as its outcome is known, appended to
$PYTEST_JSONL, so a run stopped at its cap still tells which tests passed, failed, were skipped and why, and which
one it was in. Load it with `-p pytest_jsonl` (bench/ on the path)."""
import json
import os


def _write(**row) -> None:
    with open(os.environ["PYTEST_JSONL"], "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write(test=nodeid, outcome="started")


def pytest_runtest_logreport(report):
    if report.when != "call" and report.passed:  # setup and teardown count when they fail or skip
        return
    row = {"test": report.nodeid, "outcome": report.outcome, "when": report.when, "seconds": round(report.duration, 1)}
    if report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        row["error"] = report.longreprtext.strip().splitlines()[-1][:500] if report.longreprtext else ""
    _write(**row)
