"""The life cycle every stage output folder shares: skip when done, refuse a different config, mark DONE last."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ezoforge.config import diff_keys, fingerprint, redact
from ezoforge.errors import ConfigError
from ezoforge.records import DONE, mark_done, write_json, write_text


class Stage:
    """One stage's output folder.

    `settings` is everything that shapes the output (the stage's config section, the model, the inputs and
    their own fingerprints); its hash is the fingerprint a DONE marker records.
    """

    def __init__(self, name: str, out: str | Path, settings: dict[str, Any]):
        self.name = name
        self.out = Path(out)
        self.settings = json.loads(json.dumps(redact(settings), default=str))
        self.fingerprint = fingerprint(self.settings)

    def done(self) -> dict[str, Any] | None:
        marker = self.out / DONE
        if not marker.exists():
            return None
        try:
            return json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            return None

    def start(self, force: bool = False) -> dict[str, Any] | None:
        """Return the finished run's stats when the folder is already done with these settings (a no-op rerun);
        refuse a folder made (fully or partly) with other settings unless `force`; otherwise prepare the folder,
        keeping a partial run's outputs with the same settings so the stage can resume, and return None."""
        old = self.done()
        if old is not None and old.get("fingerprint") == self.fingerprint:
            return old.get("stats", {})
        saved = self.out / "config.yaml"
        previous = old.get("settings", {}) if old is not None else (
            yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.exists() else None)
        if previous is not None and (old is not None or previous != self.settings):
            if not force:
                what = "made" if old is not None else "partly made"
                keys = diff_keys(previous, self.settings) or ["(unknown)"]
                raise ConfigError(f"{self.out} was {what} by `{self.name}` with other settings "
                                  f"(differ: {', '.join(keys)}); use --force to redo it")
            for sub in self.out.iterdir():  # a forced redo starts clean
                shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(saved, yaml.safe_dump(self.settings, allow_unicode=True, sort_keys=False))
        return None

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        write_json(self.out / "stats.json", stats)
        mark_done(self.out, self.fingerprint, stage=self.name, settings=self.settings, stats=stats)
        return stats


def input_fingerprints(paths: list[str | Path]) -> list[str]:
    """Identify inputs: a stage folder by its DONE fingerprint, a file by path, size and mtime."""
    out = []
    for p in map(Path, paths):
        marker = p / DONE
        if marker.exists():
            out.append(json.loads(marker.read_text(encoding="utf-8")).get("fingerprint", str(p)))
        elif p.exists():
            st = p.stat()
            out.append(f"{p}:{st.st_size}:{int(st.st_mtime)}")
        else:
            out.append(str(p))
    return out
