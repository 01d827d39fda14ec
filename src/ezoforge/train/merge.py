"""`ezo merge`: fold a trained adapter into its base model and write a standalone model folder.

The base is loaded in float32 — never 4-bit, whatever the adapter was trained against: merging into quantized
weights rounds the update away (a known source of broken merges). The result is cast to `dtype` only at the end.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml

from ezoforge.errors import ModelError
from ezoforge.models import pick_dtype, resolve
from ezoforge.records import DONE
from ezoforge.stage import Stage
from ezoforge.train.data import end_of_turn_id

log = logging.getLogger(__name__)


def trained_base(train_dir: Path) -> str:
    """The base model spec a finished train folder was made from."""
    if not (train_dir / DONE).exists() or not (train_dir / "adapter" / "adapter_config.json").exists():
        raise ModelError(f"{train_dir}: not a finished `ezo train` folder (needs adapter/ and DONE)")
    settings = yaml.safe_load((train_dir / "config.yaml").read_text(encoding="utf-8"))
    return settings["model"]["name"]


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the base's own, the tokenizer's eos, and the chat template's end-of-turn token
    (Llama 3 base models list only <|end_of_text|>, so a tuned model would otherwise run past <|eot_id|>)."""
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids += [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return sorted({i for i in ids if i is not None})


def run(train_dir: Path, out: Path, dtype: str = "bfloat16", force: bool = False) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_dir, out = Path(train_dir), Path(out)
    spec = trained_base(train_dir)
    target = pick_dtype(dtype, torch.device("cpu"))
    train_fp = json.loads((train_dir / DONE).read_text(encoding="utf-8"))["fingerprint"]
    stage = Stage("merge", out, {"train": str(train_dir), "train_fingerprint": train_fp, "base": spec,
                                 "dtype": str(target).removeprefix("torch.")})
    finished = stage.start(force)
    if finished is not None:
        return finished
    start = time.perf_counter()
    adapter = train_dir / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(target)
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # the tokenizer and chat template training used
    model.generation_config.eos_token_id = stop_ids(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("merged %s + %s into %s (%s)", spec, adapter, out, stage.settings["dtype"])
    return stage.finish({"base": spec, "dtype": stage.settings["dtype"],
                         "eos_token_id": model.generation_config.eos_token_id,
                         "params": sum(p.numel() for p in model.parameters()),
                         "seconds": round(time.perf_counter() - start, 1)})
