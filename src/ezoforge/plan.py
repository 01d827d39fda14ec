"""`ezo plan`: what a recipe will cost before it runs — for every stage its peak GPU memory, host memory, disk
written and hours on a card, and whether it fits; a stage that does not fit names the setting that makes it fit.

Each stage estimates itself (`STAGE/estimate.py`, named by its `stages.Step` line) from the `Planner` it is handed;
a backend estimates its share (`Backend.estimate`). Here: the cards, the text volumes, the pieces the estimates share,
and the orchestration (fits, what would make a stage fit, the printout).

Estimates, not promises: every assumption is printed with the figures, and `sources` says where each one comes
from. Where a training step was measured at the recipe's shape on the chosen card (`train.estimate.MEASURED`), its
tokens/s and peak memory are used as they are, as are the host-side rates measured by the benches (curate, merge);
everything else is the memory and speed model (`sizing`). Card memory is what nvidia-smi reports, not the GB in the
card's name.
"""
from __future__ import annotations

import glob
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ezoforge.config import Recipe, deep_merge, imported, parse_overrides, to_plain
from ezoforge.errors import RecordError, size
from ezoforge.eval.estimate import task_type
from ezoforge.infer.engines import llamacpp_ruled_out
from ezoforge.infer.registry import backend_class
from ezoforge.models import quantize_for, weight_room
from ezoforge.records import CORPUS_SOURCES, CORPUS_SUFFIXES, corpus_suffix, files_under
from ezoforge.sizing import (CHARS_PER_TOKEN_JA, DECODE_EFFICIENCY, DEQUANT_TRAFFIC, DOC_TOKENS, EVAL_PROMPT_TOKENS, GIB,
                             LINEAR_BYTES, PREFILL_MFU, PROMPT_TOKENS, SYNTHESIZER_PAIRS, TEMPLATE_TOKENS,
                             TRAIN_FLOPS_PER_PARAM, TRAIN_MFU, Card, EngineJob, Shape, largest_shard, model_shape,
                             weight_bytes)
from ezoforge.stage import done_info
from ezoforge.stages import STEPS, steps
from ezoforge.synth.estimate import synth_context
from ezoforge.synth.passages import passage_budget
from ezoforge.train.merge import configured_dtype

log = logging.getLogger(__name__)

# Memory as nvidia-smi's memory.total reports it (MiB), not the nominal GB of the card's name: an "80GB" H100 holds
# 79.6 GiB, a "48GB" L40S 45 GiB.
CARDS = {
    "h100": Card(81559 / 1024, 989, 3.35), "h200": Card(143771 / 1024, 989, 4.8),
    "a100-80gb": Card(81920 / 1024, 312, 2.0), "a100-40gb": Card(40960 / 1024, 312, 1.55),
    "l40s": Card(46068 / 1024, 362, 0.86), "l4": Card(23034 / 1024, 121, 0.3),
    "rtx4090": Card(24564 / 1024, 165, 1.0),
}
HOST_RAM_GIB = 64  # "ordinary RAM": what `--ram` assumes unless told
# Beside every stage of `ezo run`: the run itself and the fork server its stages start from (torch and transformers
# imported, no model). Measured 0.43 GiB RSS together (82 + 359 MiB) during recipes/demo-prefer.yaml on this CPU.
RUN_RAM_GIB = 0.5





# Compressed inputs are sized by typical expansion ratios for Japanese text (decompressing a 4 GB dump
# just to plan would take longer than the plan is worth).
EXPANSION = {".bz2": 4.5, ".gz": 3.5, ".parquet": 2.5}


def input_chars(patterns: list[str]) -> int:
    """Approximate characters of text in the curation inputs (UTF-8 Japanese: ~3 bytes a character)."""
    total = 0.0
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            files = files_under(name, CORPUS_SUFFIXES) if Path(name).is_dir() else [Path(name)]
            total += sum(f.stat().st_size * EXPANSION.get(f.suffix, 1.0) / 3 for f in files)
    return int(total)


def synth_mix(recipe: Recipe, docs: float) -> dict:
    """The documents synth will draw per source: `synth.mix` as set, else each source in proportion to its
    curated documents, estimated here by the size of its curate inputs (equal shares when none is on disk)."""
    if recipe.synth.mix:
        shares, basis = dict(recipe.synth.mix), "synth.mix"
    else:
        chars: dict[str, int] = {}
        for pattern in recipe.curate.inputs:
            try:
                source = CORPUS_SOURCES[corpus_suffix(pattern)]
            except RecordError:  # a folder: its files' kinds are not known before curation
                source = "other"
            chars[source] = chars.get(source, 0) + input_chars([pattern])
        total = sum(chars.values())
        basis = "input sizes (estimate)" if total else "equal (inputs not on disk)"
        shares = {s: (n / total if total else 1 / len(chars)) for s, n in chars.items()}
    return {"basis": basis, "sources": {s: {"share": round(v, 3), "documents": round(docs * v)}
                                        for s, v in sorted(shares.items())}}


@dataclass(frozen=True)
class Volume:
    """How much text each stage handles."""

    chars: int
    curated_tokens: float
    docs: float
    requests: float
    passage_tokens: float
    synth_in: float
    synth_out: float
    data_tokens: float  # the tokenized data set once: training and held-out conversations
    train_tokens: float  # tokens trained through, every epoch
    held_out_tokens: float  # tokens of the trainer's held-out evaluations, all of them
    evals: int  # the trainer's held-out evaluations
    steps: int  # optimizer steps
    eval_out: float  # one eval run's answer tokens: tasks x samples x turns
    judge_calls: float  # one eval run's verdicts: tasks x samples x judgments x turns
    missing: list[str]


def volume(recipe: Recipe, docs_kept: float) -> Volume:
    t, s = recipe.train, recipe.synth
    chars = input_chars(recipe.curate.inputs)
    curated_tokens = chars * docs_kept / CHARS_PER_TOKEN_JA
    docs = curated_tokens / DOC_TOKENS
    # Inputs not downloaded yet: a full dump holds far more documents than synth.limit, so the limit binds.
    missing = [p for p in recipe.curate.inputs if not glob.glob(p)]
    if s.limit:
        docs = s.limit if missing else min(docs, s.limit)
    prompt = PROMPT_TOKENS[s.mode]
    budget = max(32, passage_budget(s.max_passage_tokens, synth_context(recipe), prompt, s.generation.max_new_tokens))
    per_doc = math.ceil(DOC_TOKENS / budget)  # longer documents are split into passages
    passage = DOC_TOKENS / per_doc
    requests = docs * per_doc
    pairs = s.pairs_per_doc if s.mode == "prompted" else SYNTHESIZER_PAIRS
    conversations, per_request = passage_conversations(recipe, passage, pairs)
    data_tokens = requests * per_request
    held = t.eval_fraction  # of the passages, so of the conversations
    if t.max_steps:
        steps, train_tokens = t.max_steps, t.max_steps * t.batch_size * t.grad_accum * t.max_length
    else:
        train_tokens = data_tokens * (1 - held) * (t.epochs or 1)
        # Packed rows taken as full: a lower bound on the steps, so on the evaluations.
        rows = train_tokens / t.max_length if t.packing else requests * conversations * (1 - held) * (t.epochs or 1)
        steps = math.ceil(rows / (t.batch_size * t.grad_accum))
    # The trainer evaluates before step 1, every eval_every steps, and after the last step when that is off-cadence.
    evals = 1 + math.ceil(steps / t.eval_every) if held else 0
    e = recipe.eval
    # Each question's turns as its task type declares them (MT-Bench: 2); every answer is judged `judgments` times.
    turns = max((task_type(t).turns for t in e.tasks), default=1)
    answers = (e.limit or 100) * e.samples * turns
    return Volume(chars, curated_tokens, docs, requests, passage, requests * (passage + prompt),
                  requests * s.generation.max_new_tokens, data_tokens, train_tokens, evals * data_tokens * held,
                  evals, steps,
                  answers * recipe.eval.generation.max_new_tokens,
                  answers * recipe.eval.judgments if recipe.eval.judge_model else 0, missing)


def passage_conversations(recipe: Recipe, passage: float, pairs: int) -> tuple[int, float]:
    """One passage's pairs as train.group_pairs makes them conversations: (conversations, tokens). Every
    conversation holds the system prompt and the passage; every pair its instruction and response as a user and an
    assistant turn, together the synth answer's cap shared evenly among its pairs (an upper bound; how a pair splits
    between instruction and response is not modelled). `passage` puts as many pairs in one conversation as
    max_length holds, `none` one; a conversation longer than max_length is cut there."""
    t, system = recipe.train, recipe.model.system_prompt
    head = passage + (len(system) / CHARS_PER_TOKEN_JA + TEMPLATE_TOKENS if system else 0)
    turn = recipe.synth.generation.max_new_tokens / pairs + 2 * TEMPLATE_TOKENS
    fit = max(1, min(pairs, int((t.max_length - head) // turn))) if t.group_pairs == "passage" else 1
    sizes = [fit] * (pairs // fit) + ([pairs % fit] if pairs % fit else [])
    return len(sizes), sum(min(t.max_length, head + k * turn) for k in sizes)


class Planner:
    """One recipe on one card: each step's figures from its stage's own estimate (`stages.Step.estimate`, a
    function of the planner and the step's name), and the pieces those share: the recipe, the card and its count,
    the model's shape, the text volumes (`vol`), the base's dtype on the card, the adapter's size, eval's
    quantization, which stage first loads each model (it downloads it) and what an engine is asked (`engine_job`).
    An estimate adds the sentence behind its figures to `sources` (and a caveat to `notes`)."""

    def __init__(self, recipe: Recipe, card_name: str, docs_kept: float, ram_gib: float, num_gpus: int = 1):
        # A backend `auto` as the stages decide it, on the planned card (which rules llama.cpp out).
        auto = "transformers" if llamacpp_ruled_out("cuda", None, recipe.model.quantize) else "llamacpp"
        recipe = recipe.model_copy(update={
            s: getattr(recipe, s).model_copy(update={"backend": auto})
            for s in ("synth", "eval") if getattr(recipe, s).backend == "auto"})
        self.recipe, self.card_name, self.card, self.ram = recipe, card_name, CARDS[card_name], ram_gib
        self.gpus = num_gpus  # cards of this kind on the machine: FSDP shards training, synth runs an engine per set
        self.shape = model_shape(recipe.model.name)
        self.vol = volume(recipe, docs_kept)
        self.merged = STEPS["merge"].folder  # the merged model, as eval-tuned loads it
        self.sources: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.tps: float | None = None  # training tokens/s on the card, once the train estimate has made it

    def train_tokens_per_s(self) -> float:
        """Training tokens/s: the train estimate's (measured where it was), else the FLOPs model on one card."""
        return self.tps or self.card.bf16_tflops * 1e12 * TRAIN_MFU / (TRAIN_FLOPS_PER_PARAM * self.shape.params)

    # ------------------------------------------------------------ shared pieces

    def base_dtype(self) -> str:
        return "float32" if self.recipe.model.dtype == "float32" else "bfloat16"  # auto is bf16 on a GPU

    def merged_bytes(self) -> float:
        """Bytes per parameter of the merged model: merge.dtype, or with auto the base's as its config names it (a
        hub base, whose config is not read here, is 16-bit)."""
        dtype = self.recipe.merge.dtype
        if dtype == "auto":
            config = Path(self.recipe.model.name).expanduser() / "config.json"
            dtype = configured_dtype(json.loads(config.read_text()) if config.is_file() else {}) or "bfloat16"
        return LINEAR_BYTES.get(dtype, 2.0)

    def lora_params(self) -> float:
        return self.recipe.train.lora_r * sum(a + b for a, b in self.shape.linear_dims) * self.shape.layers

    def download(self, stage: str, spec: str, shape: Shape) -> float:
        """A hub model is written to the hub cache by the first stage that loads it (a cached one writes nothing)."""
        if Path(spec).expanduser().exists() or spec.startswith("bundled:"):
            return 0.0
        r = self.recipe
        loads = {"synth": set() if backend_class(r.synth.backend).served else {r.synth.model or r.model.name},
                 "train": {r.model.name}, "merge": {r.model.name},
                 "eval-base": {r.model.name} | ({r.eval.judge_model} if r.eval.judge_url == "local" else set())}
        first = next((s for s in steps(r) if spec in loads.get(s, ())), None)
        return shape.params * 2 if first == stage else 0.0

    def eval_quantize(self) -> str:
        """model.quantize as eval's answers get it; auto as models.auto_quantize decides on an idle card: none
        where the weights leave its headroom free, else nf4."""
        setting = self.recipe.model.quantize
        if setting != "auto":
            return setting
        card = self.card.memory_gib * GIB  # an idle card: all of it free
        return quantize_for(weight_bytes(self.shape, self.base_dtype()), weight_room(card, card, "cuda"))

    # ------------------------------------------------------------ stages

    def engine_job(self, kind, spec: str, context: int, seq_tokens: float, batch: int, scheme: str,
                   adapter: bool = False) -> EngineJob:
        """What a stage asks of its backend (`kind`): the model in `scheme` (+ the adapter) where it loads here."""
        made_from = self.recipe.model.name if spec == STEPS["merge"].folder else spec  # the merge has the base's shape
        if made_from != self.recipe.model.name and kind.served:  # a server's name for its model: shape unknown here
            return EngineJob(self.card, None, spec, self.base_dtype(), context, seq_tokens, batch, 0.0, 0.0, 0.0)
        shape = self.shape if made_from == self.recipe.model.name else model_shape(made_from)
        weights = weight_bytes(shape, scheme) + (self.lora_params() * 2 if adapter else 0.0)
        # bitsandbytes decodes a batch by dequantizing each weight to 16-bit first: more bytes move.
        traffic = shape.params * DEQUANT_TRAFFIC[scheme] if scheme in DEQUANT_TRAFFIC else weights
        return EngineJob(self.card, shape, spec, self.base_dtype(), context, seq_tokens, batch, weights, traffic,
                         largest_shard(made_from, shape)[0])

    def local_judge_gib(self) -> float:
        """A `local` judge's weights and the KV cache of eval.concurrency verdicts on the card (0 for a served one)."""
        e = self.recipe.eval
        if e.judge_url != "local":
            return 0.0
        shape = model_shape(e.judge_model)
        return (weight_bytes(shape, self.base_dtype()) +
                e.concurrency * (EVAL_PROMPT_TOKENS * 3 + e.judge_max_tokens) * shape.kv_bytes_per_token) / GIB

    def estimate(self, name: str) -> dict:
        """The step's figures as its stage estimates them: gpu_gib, ram_gib, disk_gib, hours (None: not planned)."""
        return imported(STEPS[name].estimate)(self, name)

    def stage(self, name: str) -> dict:
        """The step's figures and whether it fits the card and the host."""
        est = self.estimate(name)
        est["fits"] = bool(est.pop("fits_gpu", est["gpu_gib"] <= self.card.memory_gib) and
                           est["ram_gib"] + RUN_RAM_GIB <= self.ram)
        return est


def vllm_candidates(section: str) -> list[list[str]]:
    q, ctx = f"{section}.vllm.quantization", f"{section}.context_tokens=4096"
    util = f"{section}.vllm.gpu_memory_utilization=0.95"
    # A 70B in FP8 with a 4k context needs a little more than 0.9 of an 80 GB card: FP8 is faster than bitsandbytes.
    return [[util], [ctx], [f"{q}=fp8"], [f"{q}=fp8", ctx], [f"{q}=fp8", ctx, util],
            [f"{q}=bitsandbytes"], [f"{q}=bitsandbytes", ctx],
            *[[f"{section}.vllm.tensor_parallel_size={n}"] for n in (2, 4, 8)]]


# What may make a stage fit, in the order tried: the least change to what the run produces first. A candidate that
# does not validate (an engine setting under another backend) is skipped.
CANDIDATES = {
    "synth": [*vllm_candidates("synth"),
              ["synth.backend=vllm", "synth.model=instruction-pretrain/instruction-synthesizer",
               "synth.mode=synthesizer", "synth.context_tokens=4096"]],
    "train": [["train.gradient_checkpointing=true"], ["train.qlora=true"],
              *[[f"train.batch_size={b}", f"train.grad_accum={g}"] for b, g in ((2, 2), (1, 4))],
              *[[f"train.max_length={n}"] for n in (2048, 1024)]],
    "prefer": [["train.gradient_checkpointing=true"], ["train.qlora=true"], ["prefer.batch_size=1"],
               *[[f"prefer.max_length={n}"] for n in (1024, 512)]],
    "reinforce": [["train.gradient_checkpointing=true"], ["train.qlora=true"], ["reinforce.batch_size=1"],
                  *[[f"reinforce.vllm_gpu_memory_utilization={u}"] for u in (0.2, 0.4, 0.5)],
                  ["reinforce.num_generations=4"],
                  *[[f"reinforce.max_completion_length={n}"] for n in (256, 128)]],
    "eval": [*[[f"eval.generation.batch_size={b}"] for b in (16, 8, 4, 1)], ["model.quantize=int8"],
             ["model.quantize=nf4"], *[["model.quantize=nf4", f"eval.generation.batch_size={b}"] for b in (8, 1)],
             *vllm_candidates("eval")],
}


def with_settings(recipe: Recipe, overrides: list[str]) -> Recipe | None:
    """The recipe with dotted overrides applied; None where they do not validate (or the setting is absent)."""
    from pydantic import ValidationError

    try:
        return type(recipe).model_validate(deep_merge(to_plain(recipe), parse_overrides(overrides)))
    except ValidationError:
        return None


def to_fit(recipe: Recipe, stage: str, card_name: str, docs_kept: float, ram_gib: float,
           num_gpus: int = 1) -> str | None:
    """The first candidate setting under which the stage fits, as `key: value, …` (None when none does)."""
    train_scale = recipe.train.batch_size * recipe.train.grad_accum
    for overrides in CANDIDATES.get(stage.split("-")[0], []):
        if stage == "train" and overrides[0].startswith("train.batch_size"):
            batch = int(overrides[0].split("=")[1])
            if batch >= recipe.train.batch_size:
                continue
            overrides = [overrides[0], f"train.grad_accum={max(1, train_scale // batch)}"]  # same global batch
        changed = with_settings(recipe, overrides)
        if changed is None or to_plain(changed) == to_plain(recipe):
            continue
        if Planner(changed, card_name, docs_kept, ram_gib, num_gpus).stage(stage)["fits"]:
            return ", ".join(o.replace("=", ": ", 1) for o in overrides)
    return None


def plan(recipe: Recipe, card_name: str = "h100", docs_kept: float = 0.5, ram_gib: float = HOST_RAM_GIB,
         num_gpus: int = 1) -> dict:
    p = Planner(recipe, card_name, docs_kept, ram_gib, num_gpus)
    stages: dict[str, dict] = {}
    for name in steps(recipe):
        est = p.stage(name)
        if not est["fits"]:
            est["to_fit"] = to_fit(recipe, name, card_name, docs_kept, ram_gib, num_gpus) or (
                f"no recipe setting: needs {est['ram_gib'] + RUN_RAM_GIB:.1f} GiB of RAM (--ram)"
                if est["ram_gib"] + RUN_RAM_GIB > ram_gib
                else f"no single recipe setting: needs {est['gpu_gib']:.1f} GiB of GPU memory")
        stages[name] = {k: (round(v, 2 if k == "hours" else 1) if isinstance(v, float) else v)
                        for k, v in est.items()}
    vol, shape = p.vol, p.shape
    train = stages.get("train") or p.stage("train")
    grouping = group_pairs_training(recipe, card_name, docs_kept, ram_gib, num_gpus)
    chosen = recipe.train.group_pairs
    p.notes["train_group_pairs"] = "; ".join(
        f"train.group_pairs {k}{' (chosen)' if k == chosen else ''}: {v['train_tokens']:,} tokens, {v['hours']} h"
        for k, v in sorted(grouping.items(), key=lambda kv: kv[0] != chosen))
    hours = {name: stages[name]["hours"] for name in ("synth", "train") if name in stages}
    evals = [stages[n]["hours"] for n in stages if n.startswith("eval")]
    if evals:
        hours["eval"] = None if None in evals else round(sum(evals), 3)  # a served or CPU engine: not planned
    return {
        "model": recipe.model.name, "card": card_name, "card_gib": round(p.card.memory_gib, 1), "ram_gib": ram_gib,
        "num_gpus": num_gpus,
        "params_b": round(shape.params / 1e9, 2),
        "tokens": {"curate_in": int(vol.chars / CHARS_PER_TOKEN_JA), "curate_kept": int(vol.curated_tokens),
                   "synth_in": int(vol.synth_in), "synth_out": int(vol.synth_out), "train": int(vol.train_tokens),
                   "train_data": int(vol.data_tokens), "train_held_out": int(vol.held_out_tokens),
                   "eval_out": int(vol.eval_out * len(evals)), "judge_calls": int(vol.judge_calls * len(evals))},
        "synth_mix": synth_mix(recipe, vol.docs),
        "stages": stages,
        "fits": all(s["fits"] for s in stages.values()),
        "train_memory_gib": train["gpu_gib"],
        "train_by_group_pairs": grouping,
        "hours": hours,
        "run_ram_gib": RUN_RAM_GIB,
        "sources": {**p.sources, "run_ram_gib": f"measured: {RUN_RAM_GIB} GiB for `ezo run` and its stages' fork "
                    "server, beside each stage's own RAM (fits counts both)", "decode_tokens_per_s": f"model: {DECODE_EFFICIENCY:.0%} of the memory-bandwidth "
                    f"bound at the batch decoded together, capped at {PREFILL_MFU:.0%} of bf16 peak; not measured"},
        "notes": p.notes,
        "assumptions": {"docs_kept_fraction": docs_kept, "chars_per_token": CHARS_PER_TOKEN_JA,
                        "train_tokens_per_s": round(p.tps), "qlora": recipe.train.uses_qlora("cuda"),
                        "gradient_checkpointing": recipe.train.gradient_checkpointing,
                        "eval_quantize": p.eval_quantize(),
                        **({"inputs_missing": vol.missing, "documents_from": "synth.limit" if recipe.synth.limit
                            else "none"} if vol.missing else {})},
    }


def group_pairs_training(recipe: Recipe, card_name: str, docs_kept: float, ram_gib: float, num_gpus: int = 1) -> dict:
    """Tokens trained and train hours under each train.group_pairs setting, all else as the recipe has it."""
    out = {}
    for setting in ("passage", "none"):
        changed = recipe.model_copy(update={"train": recipe.train.model_copy(update={"group_pairs": setting})})
        planner = Planner(changed, card_name, docs_kept, ram_gib, num_gpus)
        out[setting] = {"train_tokens": int(planner.vol.train_tokens), "hours": round(planner.estimate("train")["hours"], 2)}
    return out


def summary_lines(result: dict) -> list[str]:
    """The plan in the form recipe comments state it (tests/test_plan.py compares the two): a heading, then
    `STAGE G GiB GPU / R GiB RAM / H h`, two stages a line, and the verdict."""
    entries = [f"{name} {s['gpu_gib']} GiB GPU / {s['ram_gib']} GiB RAM" + ("" if s["hours"] is None
                                                                           else f" / {s['hours']} h")
               for name, s in result["stages"].items()]
    entries.append("fits" if result["fits"] else "does not fit")
    cards = f" --num-gpus {result['num_gpus']}" if result["num_gpus"] > 1 else ""
    return [f"ezo plan --gpu {result['card']}{cards}:"] + ["  " + " · ".join(entries[i:i + 2])
                                                     for i in range(0, len(entries), 2)]


def print_plan(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cards = f"{result['num_gpus']} x " if result["num_gpus"] > 1 else ""
    table = Table(title=f"ezo plan — {result['model']} ({result['params_b']} B params) on {cards}{result['card']} "
                        f"({result['card_gib']} GiB{' each' if cards else ''}) with {result['ram_gib']} GiB RAM")
    for col in ("stage", "GPU GiB", "RAM GiB", "disk GiB", "hours", "fits"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in result["stages"].items():
        unknown = "—"  # inputs not on disk yet, or a server elsewhere (see the notes below)
        table.add_row(name, f"{s['gpu_gib']}", f"{s['ram_gib']}",
                      *(unknown if s[k] is None else f"{s[k]}" for k in ("disk_gib", "hours")),
                      "yes" if s["fits"] else f"NO — {s['to_fit']}")
    console = Console()
    console.print(table)
    tok = result["tokens"]
    console.print(f"tokens: curate {tok['curate_in']:,} in → ~{tok['curate_kept']:,} kept; synth {tok['synth_in']:,}"
                  f" in / {tok['synth_out']:,} out; train {tok['train']:,} (+{tok['train_held_out']:,} held-out, "
                  f"evaluated); eval {tok['eval_out']:,} out "
                  f"({tok['judge_calls']:,} judge calls)")
    mix = result["synth_mix"]
    console.print("synth draws " + ", ".join(f"{s} {v['share']:.0%} (~{v['documents']:,} documents)"
                                             for s, v in mix["sources"].items()) + f"; shares from {mix['basis']}")
    console.print(("every stage fits" if result["fits"] else "does NOT fit")
                  + f" on {cards or 'one '}{result['card']}",
                  highlight=False)
    for line in summary_lines(result):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"assumptions: {json.dumps(result['assumptions'])}", highlight=False)
    for figure, source in {**result["sources"], **result["notes"]}.items():
        console.print(f"{figure}: {source}", highlight=False)

# nvidia-smi's name of a card -> `ezo plan`'s card (first match wins: the 80 GB A100 before the 40 GB one).
CARD_NAMES = [("H200", "h200"), ("H100", "h100"), ("A100-SXM4-80GB", "a100-80gb"), ("A100 80GB", "a100-80gb"),
              ("A100", "a100-40gb"), ("L40S", "l40s"), ("L4", "l4"), ("4090", "rtx4090")]


def card_here() -> str | None:
    """`ezo plan`'s name for the first card nvidia-smi lists; None without one (or one it does not know)."""
    from ezoforge.pipeline import nvidia_smi

    names = nvidia_smi("name")
    return next((card for key, card in CARD_NAMES for name in names[:1] if key in name), None)


def step_of(recipe: Recipe, stage: str) -> str | None:
    """The recipe's step for a step or stage name (a stage's first step: `eval` is eval-base)."""
    plan_steps = steps(recipe)
    return stage if stage in plan_steps else next((s for s in plan_steps if STEPS[s].stage == stage), None)


FAULT_FIGURES = {"disk": ("disk_gib", "disk"), "ram": ("ram_gib", "host memory"), "gpu": ("gpu_gib", "GPU memory")}


def fault_figure(recipe: Recipe, stage: str | None, resource: str | None) -> str | None:
    """The plan's figure for what a stage ran out of, as a clause to put beside the fault (None where it has none)."""
    step = step_of(recipe, stage) if stage else None
    if step is None or resource not in FAULT_FIGURES:
        return None
    key, what = FAULT_FIGURES[resource]
    try:
        figure = Planner(recipe, card_here() or "h100", 0.5, HOST_RAM_GIB).stage(step)[key]
    except Exception as e:  # the fault is what the user must read; a plan that cannot be made must not hide it
        log.info("no plan figure for %s: %s", step, e)
        return None
    return None if figure is None else f"ezo plan puts {step}'s {what} at {size(figure * GIB)}"


def _finished(folder: Path) -> bool:
    try:
        return done_info(folder) is not None
    except RecordError:  # another version's folder: the stage refuses it, or redoes it under --force
        return False


def disk_to_run(recipe: Recipe) -> tuple[float, list[str]]:
    """GiB of disk the steps not yet done will write, by the plan (those it cannot size are listed, not counted)."""
    planner, total, unsized = Planner(recipe, card_here() or "h100", 0.5, HOST_RAM_GIB), 0.0, []
    for step in steps(recipe):
        if not _finished(Path(recipe.workdir) / STEPS[step].folder):
            disk = planner.stage(step)["disk_gib"]
            if disk is None:
                unsized.append(step)
            else:
                total += disk
    return total, unsized

