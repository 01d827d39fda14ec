"""`ezo export`: a merged model folder -> a folder ready to publish.

OUT holds the weights, tokenizer and generation config, README.md (the model card), eval.png when the run has
evals, and in OUT/gguf/ a GGUF file per `--gguf` type with an Ollama Modelfile (a subfolder: transformers, reading
a GGUF beside a tokenizer.json, takes that folder's tokenizer files and drops the GGUF's chat template).
OUT is built in a temporary sibling folder and renamed into place, so it is complete (DONE last) or absent.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ezoforge import gguf_file
from ezoforge.config import to_plain
from ezoforge.errors import ModelError
from ezoforge.eval.compare import paired_diff
from ezoforge.export import card
from ezoforge.export.ollama import modelfile
from ezoforge.export.provenance import RunRecords, gather
from ezoforge.export.settings import ExportConfig
from ezoforge.models import check_model_folder
from ezoforge.records import DONE, write_text
from ezoforge.stage import Stage, done_info
from ezoforge.turns import end_of_turn_id

log = logging.getLogger(__name__)

STAGE_FILES = {DONE, "config.yaml", "stats.json"}  # the merge stage's records, not part of the model


def title(rec: RunRecords, cfg: ExportConfig, out: Path) -> str:
    if cfg.repo:
        return cfg.repo.split("/")[-1]
    base = rec.base_model
    return f"{(card.hub_id(base) or Path(base).name).split('/')[-1]}-ja" if base else out.name


def _copy_model(merged: Path, dst: Path) -> list[str]:
    names = []
    for src in sorted(merged.iterdir()):
        if src.is_file() and src.name not in STAGE_FILES and not src.name.startswith("."):
            try:
                os.link(src, dst / src.name)  # weights are large; a hard link costs nothing
            except OSError:
                shutil.copy2(src, dst / src.name)
            names.append(src.name)
    return names


def _paired_diff(rec: RunRecords) -> dict | None:
    if not {"base", "tuned"} <= set(rec.evals):
        return None
    return paired_diff(rec.eval_dirs["base"], rec.eval_dirs["tuned"])[0]


def _stops(model_dir: Path, tokenizer) -> list[str]:
    gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")) \
        if (model_dir / "generation_config.json").exists() else {}
    ids = gen.get("eos_token_id", tokenizer.eos_token_id)
    ids = ids if isinstance(ids, list) else [ids]
    ids = list(dict.fromkeys([*ids, end_of_turn_id(tokenizer)]))  # Gemma's turn ends with <end_of_turn>, not <eos>
    return [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None]


def run(merged: str | Path, out: str | Path, cfg: ExportConfig, system_prompt: str | None = None, *,
        evals: dict[str, Path], made: list[tuple[str, str]] = (), force: bool = False) -> dict:
    """Export `merged` into `out`. `system_prompt` is used only when the run's train records name none; `evals`
    ("base"/"sft"/"tuned" -> an eval folder) are the reports the card may show (those of this model or its base);
    `made` is each stage behind the model with its sentence (`stages.how_it_was_made`), which the card lists."""
    merged, out = Path(merged), Path(out)
    if not (merged / "config.json").is_file():
        raise ModelError(f"{merged}: not a model folder (no config.json); export takes an `ezo merge` output")
    check_model_folder(merged, weights=True)
    if cfg.gguf:
        gguf_file.check(merged)  # an unsupported model fails before anything is written
    rec = gather(merged, evals)
    system = rec.system_prompt if rec.train else system_prompt
    # Every record the card reads is an input: a redone stage or eval redoes the export.
    folders = [merged] + [f for f in rec.folders() if f != merged]
    stage = Stage("export", out, {"export": to_plain(cfg), "system_prompt": system}, inputs=folders, atomic=True)
    finished = stage.start(force)
    if finished is not None:
        return finished
    start = time.perf_counter()
    with stage.claimed():
        stats = _build(merged, stage, rec, cfg, system, title(rec, cfg, out), cfg.repo or str(out.resolve()), made)
    log.info("exported %s to %s in %.0f s", merged, out, time.perf_counter() - start)
    return stats


def _build(merged: Path, stage: Stage, rec: RunRecords, cfg: ExportConfig, system: str | None, name: str,
           model_ref: str, made: list[tuple[str, str]]) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tmp = stage.folder
    files = _copy_model(merged, tmp)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ggufs: dict[str, str] = {}
    gguf_stats = []
    for kind in cfg.gguf:
        ggufs[kind] = f"{name}-{kind}.gguf"
        gguf_stats.append(gguf_file.write(merged, tmp / "gguf" / ggufs[kind], kind))
    if ggufs:  # one Modelfile, for the first type listed (edit FROM for another)
        write_text(tmp / "gguf" / "Modelfile", modelfile(next(iter(ggufs.values())), tokenizer.chat_template or "",
                                                         system, _stops(merged, tokenizer)))
    chart = card.eval_chart(rec)
    if chart:
        (tmp / "eval.png").write_bytes(chart)
    write_text(tmp / "README.md", card.render(rec, name, model_ref, system, ggufs, _paired_diff(rec), bool(chart),
                                              made))
    return stage.finish({"title": name, "model_files": files, "gguf": gguf_stats, "chart": bool(chart),
                            "evals": sorted(rec.evals), "seconds": round(time.perf_counter() - start, 1)})


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo export` prints and the run report shows."""
    s = done_info(folder).stats
    ggufs = [f"gguf/{g['file']}" for g in s.get("gguf", [])]
    return "model card (README.md" + (", eval.png" if s.get("chart") else "") + "".join(f", {g}" for g in ggufs) + \
        (", gguf/Modelfile" if ggufs else "") + ")"
