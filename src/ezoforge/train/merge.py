"""`ezo merge`: fold a trained adapter into its base model and write a standalone model folder.

The base is loaded in float32 — never 4-bit, whatever the adapter was trained against: merging into quantized
weights rounds the update away (a known source of broken merges). The result is cast to `dtype` only at the end.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ezoforge.errors import ModelError
from ezoforge.models import pick_dtype, resolve, stop_token_ids
from ezoforge.stage import Stage, done_info

log = logging.getLogger(__name__)


def trained(train_dir: Path) -> dict:
    """A finished train folder's DONE marker (its settings name the base model)."""
    info = done_info(train_dir)
    if info is None or not (train_dir / "adapter" / "adapter_config.json").exists():
        raise ModelError(f"{train_dir}: not a finished `ezo train` folder (needs adapter/ and DONE)")
    return info


def run(train_dir: Path, out: Path, dtype: str = "bfloat16", force: bool = False) -> dict:
    train_dir, out = Path(train_dir), Path(out)
    info = trained(train_dir)
    spec = info["settings"]["model"]["name"]
    target = pick_dtype(dtype, torch.device("cpu"))
    # The folder appears by rename once complete: a killed merge never leaves a loadable half model.
    stage = Stage("merge", out, {"train_fingerprint": info["fingerprint"], "base": spec,
                                 "dtype": str(target).removeprefix("torch.")}, atomic=True, inputs=[train_dir])
    finished = stage.start(force)
    if finished is not None:
        return finished
    with stage.claimed():
        return _merge(train_dir, stage, spec, target)


def _merge(train_dir: Path, stage: Stage, spec: str, target: torch.dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    adapter = train_dir / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(target)
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # the tokenizer and chat template training used
    model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(stage.folder)
    tokenizer.save_pretrained(stage.folder)
    log.info("merged %s + %s into %s (%s)", spec, adapter, stage.out, stage.settings["dtype"])
    return stage.finish({"base": spec, "dtype": stage.settings["dtype"],
                         "eos_token_id": model.generation_config.eos_token_id,
                         "params": sum(p.numel() for p in model.parameters()),
                         "seconds": round(time.perf_counter() - start, 1)})
