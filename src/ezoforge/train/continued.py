"""What a stage that continues the SFT (prefer, reinforce) reads from it: the model and training settings it was
made with, and its instructions, the single-turn pairs it was trained on (never eval tasks). prefer samples answers
to them for its verdicts; reinforce samples completions to them for its rewards."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ezoforge.config import ModelConfig, Recipe, output_settings
from ezoforge.errors import ConfigError, ModelError, RecordError
from ezoforge.records import Done, read_rows
from ezoforge.stage import done_info, input_files
from ezoforge.train.data import row_messages
from ezoforge.train.settings import TrainConfig

# The recipe's judge, as eval uses it: what shapes a verdict.
JUDGE_KEYS = ("judge_url", "judge_model", "judge_backend", "judge_max_tokens", "judge_structured", "judge_reason_max_chars",
              "judge_reasks", "judgments", "judge_temperature")


def sft(train_dir: Path, recipe: Recipe) -> tuple[Done, ModelConfig, TrainConfig]:
    """The finished SFT folder's DONE marker, and the model and training settings it was made with (operational
    keys from the recipe); a model setting the recipe states otherwise is refused."""
    info = done_info(train_dir)
    if info is None or info.stage != "train" or not (train_dir / "adapter" / "adapter_config.json").is_file():
        raise ModelError(f"{train_dir}: not a finished `ezo train` folder (needs adapter/ and DONE)")
    if not info.inputs:
        raise ModelError(f"{train_dir}/DONE names no inputs: cannot tell which pairs the SFT was trained on")
    from ezoforge.models import pin

    recorded = info.settings
    made = dict(recorded["model"])
    revision = made.pop("revision", None)  # a hub base's commit, which train loaded: loaded again
    stated = {k: v for k, v in output_settings(recipe.model).items() if k in recipe.model.model_fields_set}
    if differ := [k for k, v in stated.items() if made.get(k) != v]:
        raise ConfigError(f"model.{differ[0]}: the recipe says {stated[differ[0]]!r} but {train_dir} was trained with "
                          f"{made.get(differ[0])!r}; this stage continues that SFT (leave model.{differ[0]} unset)")
    model = ModelConfig.model_validate({**made, "name": pin(made["name"], revision),
                                        **{k: getattr(recipe.model, k) for k in ModelConfig.operational}})
    train = TrainConfig.model_validate({**recorded["output"]["train"],
                                        **{k: getattr(recipe.train, k) for k in TrainConfig.operational}})
    return info, model, train



@dataclass(frozen=True)
class Instruction:
    id: str
    prompt: str  # the user turn as the SFT saw it (the passage, then the instruction, when the pair has one)
    reference: str  # the synthesized response the SFT learned
    doc_id: str | None
    origin: str  # FILE:LINE


def read_instructions(inputs: list[str | Path]) -> tuple[list[Instruction], int]:
    """Single-turn pairs of the SFT's inputs (synth folders or pair files), first occurrence of each prompt;
    and how many rows were skipped (multi-turn conversations, repeated prompts)."""
    out, seen, skipped = [], set(), 0
    for path in input_files(list(inputs)):
        for n, row in read_rows(path):
            turns = [m for m in row_messages(path, n, row, None) if m["role"] != "system"]
            if [m["role"] for m in turns] != ["user", "assistant"] or turns[0]["content"] in seen:
                skipped += 1
                continue
            seen.add(turns[0]["content"])
            out.append(Instruction(str(row.get("id") or f"{Path(path).name}:{n}"), turns[0]["content"],
                                   turns[1]["content"], row.get("doc_id"), f"{path}:{n}"))
    if not out:
        raise RecordError(f"{', '.join(map(str, inputs))}: no single-turn instruction/response pair to draw from")
    return out, skipped


def draw(items: list[Instruction], limit: int | None, seed: int) -> list[Instruction]:
    """A seeded random order, cut at `limit`: the first N of a larger limit are the N of a smaller one."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:limit]]
