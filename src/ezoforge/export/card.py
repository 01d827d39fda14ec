"""The model card (README.md with Hugging Face metadata) and its eval chart, from the run's own records only.

Every figure comes from a stage's stats.json, config.yaml or an eval report.json; a section whose records are
absent is left out rather than filled in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ezoforge.eval.eval_report import pairwise_words, scored_as
from ezoforge.eval.tasks import METRICS
from ezoforge.export.provenance import RunRecords
from ezoforge.models import is_hub_id
from ezoforge.report_kit import metric_bars, png_bytes

# Bundled models' hub ids (a local spec names no hub repo).
HUB_IDS = {"bundled:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

LLAMA31_NOTICE = (
    "This model is built on Llama 3.1. **Built with Llama.** Llama 3.1 is licensed under the Llama 3.1 Community "
    "License, Copyright © Meta Platforms, Inc. All Rights Reserved "
    "([licence](https://www.llama.com/llama3_1/license/), "
    "[acceptable use policy](https://www.llama.com/llama3_1/use-policy/)). Redistributing it means passing on a "
    "copy of that licence with this notice, and a model derived from it has a name that begins with \"Llama\".")
SMOLLM2_NOTICE = ("The base model, SmolLM2 by Hugging Face, is released under the Apache License 2.0 "
                  "(<https://www.apache.org/licenses/LICENSE-2.0>); this derivative keeps that licence.")
QWEN3_NOTICE = ("The base model, Qwen3 by the Qwen team (Alibaba Cloud), is released under the Apache License 2.0 "
                "(<https://www.apache.org/licenses/LICENSE-2.0>); this derivative keeps that licence.")
GEMMA3_NOTICE = (
    "This model is built on Gemma 3. Gemma is provided under and subject to the Gemma Terms of Use found at "
    "<https://ai.google.dev/gemma/terms>, including the Gemma Prohibited Use Policy "
    "(<https://ai.google.dev/gemma/prohibited_use_policy>). Redistributing it means passing on those use restrictions "
    "and a copy of the terms, and stating that this model is a modified version of Gemma.")
MISTRAL_NOTICE = ("The base model, by Mistral AI, is released under the Apache License 2.0 "
                  "(<https://www.apache.org/licenses/LICENSE-2.0>); this derivative keeps that licence.")
# (words in the base model's name, Hugging Face licence id, notice). Mistral AI releases some models under other
# licences (research, commercial): only the Apache-2.0 ones are named here, the others stay "unknown".
LICENCES = [(("llama-3.1", "llama3.1", "llama-31", "llama31"), "llama3.1", LLAMA31_NOTICE),
            (("smollm2",), "apache-2.0", SMOLLM2_NOTICE),
            (("qwen3",), "apache-2.0", QWEN3_NOTICE),
            (("gemma-3", "gemma3"), "gemma", GEMMA3_NOTICE),
            (("mistral-7b", "mistral-nemo", "mistral-small-24b", "mistral-small-3"), "apache-2.0", MISTRAL_NOTICE)]

USAGE_PROMPT = "日本の四季について、それぞれの特徴を簡単に教えてください。"


def hub_id(spec: str | None) -> str | None:
    if spec is None:
        return None
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    return spec if is_hub_id(spec) else None


def licence(spec: str | None) -> tuple[str | None, str]:
    names = f"{spec} {hub_id(spec)}".lower()
    for words, licence_id, notice in LICENCES:
        if any(w in names for w in words):
            return licence_id, notice
    return None, (f"The base model's licence ({spec or 'base model not recorded'}) is unknown to ezoforge: check "
                  "it and state it here before publishing; this derivative is bound by it.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("–" if v is None else _fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _facts(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"- {k}: {_fmt(v)}" for k, v in pairs if v is not None)


def hub_datasets(rec: RunRecords) -> list[str]:
    """Curated inputs downloaded from the Hub keep the dataset's id in their cache path (datasets--ORG--NAME)."""
    return sorted({part.removeprefix("datasets--").replace("--", "/", 1) for c in rec.curate
                   for path in c["stats"].get("inputs", []) for part in Path(path).parts
                   if part.startswith("datasets--")})


def metadata(rec: RunRecords, gguf: list[str]) -> dict[str, Any]:
    base = hub_id(rec.base_model)
    licence_id, _ = licence(rec.base_model)
    train = (rec.train or {}).get("stats", {})
    tags = ["ezoforge", "japanese", "text-generation"]
    if rec.train:
        tags += ["qlora" if train.get("qlora") else "lora", "sft"]
    tags += ["gguf"] * bool(gguf)
    meta: dict[str, Any] = {"language": ["ja"], "library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": tags}
    if base:
        meta["base_model"] = base
    if licence_id:
        meta["license"] = licence_id
    datasets = hub_datasets(rec)
    if datasets:
        meta["datasets"] = datasets
    return meta


def _data_section(rec: RunRecords) -> list[str]:
    out: list[str] = []
    for c in rec.curate:
        s, cfg = c["stats"], c["output"].get("curate", {})
        out.append(f"Curated documents: {_fmt(s.get('docs_out'))} kept of {_fmt(s.get('docs_in'))} read "
                   f"from {', '.join(Path(i).name for i in s.get('inputs', [])) or 'the inputs'}.")
        removed = s.get("removed_by_filter") or {}
        if removed:
            out.append("Removed by filter (documents): " + ", ".join(f"{k} {v}" for k, v in removed.items()) + ".")
        filters = [k for k, v in (cfg.get("filters") or {}).items() if v.get("enabled", True)]
        if filters:
            out.append("Japanese quality filters: " + ", ".join(filters) + ".")
        dedup = cfg.get("dedup") or {}
        if dedup.get("enabled"):
            out.append(f"Near-duplicates removed with MinHash LSH on character {dedup['n_grams']}-grams "
                       f"({dedup['num_buckets']} bands × {dedup['hashes_per_bucket']} rows).")
    for s_ in rec.synth:
        s, cfg = s_["stats"], s_["output"].get("synth", {})
        out.append(f"Instruction pairs: {_fmt(s.get('pairs'))} synthesized from {_fmt(s.get('documents'))} documents "
                   f"by `{s.get('generator') or s_['model'].get('name')}` ({cfg.get('mode')} mode; "
                   f"{_fmt(s.get('rejected'))} rejected by the pair filters).")
        by_source = s.get("by_source") or {}
        if by_source:
            out.append(_table(["source", "documents", "passages", "documents with pairs", "pairs"],
                              [[k, v.get("documents"), v.get("passages"), v.get("documents_with_pairs"),
                                v.get("pairs")] for k, v in by_source.items()]))
    used = (rec.train or {}).get("stats", {}).get("pairs_by_source") or {}
    if used:
        out.append("Pairs trained on, by source: " + ", ".join(f"{k} {_fmt(v)}" for k, v in used.items()) + ".")
    return out


def _method_section(rec: RunRecords) -> str:
    if not rec.train:
        return ""
    s, cfg = rec.train["stats"], rec.train["output"].get("train", {})
    targets = cfg.get("target_modules")
    seconds = s.get("seconds")
    facts = [
        ("method", ("QLoRA (4-bit NF4 base)" if s.get("qlora") else "LoRA") + " supervised fine-tuning, "
         + ("loss on responses and source passages" if cfg.get("context_loss") else "loss on assistant turns only")),
        ("LoRA r / alpha / dropout", f"{cfg.get('lora_r')} / {cfg.get('lora_alpha')} / {cfg.get('lora_dropout')}"),
        ("target modules", ", ".join(targets) if isinstance(targets, list) else targets),
        ("learning rate", cfg.get("learning_rate")),
        ("batch size × gradient accumulation", f"{cfg.get('batch_size')} × {cfg.get('grad_accum')}"),
        ("max length (tokens)", cfg.get("max_length")),
        ("optimizer steps", s.get("steps")),
        ("training examples", s.get("examples")),
        ("tokens in training examples", s.get("train_tokens")),
        ("tokens with loss", s.get("trained_tokens")),
        ("train loss (first → last step)", f"{_fmt(s['train_loss_first'])} → {_fmt(s['train_loss_last'])}"
         if s.get("train_loss_first") is not None else None),
        ("eval loss (before → after)", f"{_fmt(s['eval_loss_start'])} → {_fmt(s['eval_loss'])}"
         if s.get("eval_loss_start") is not None and s.get("eval_loss") is not None else None),
        ("hardware", s.get("hardware") or s.get("device")),
        ("training time", f"{seconds / 3600:.2f} h ({seconds:,.0f} s)" if seconds else None),
        ("merged weights dtype", (rec.merged or {}).get("output", {}).get("merge", {}).get("dtype")),
    ]
    return _facts(facts)


def _preference_section(rec: RunRecords) -> str:
    """DPO after the SFT: the preference data's provenance and figures."""
    if not rec.prefer:
        return ""
    s, cfg = rec.prefer["stats"], rec.prefer["output"].get("prefer", {})
    judge = rec.prefer["output"].get("eval", {})
    before, after = s.get("held_out_before") or {}, s.get("held_out_after") or {}
    return _facts([
        ("method", f"DPO ({cfg.get('loss_type')}, beta {cfg.get('beta')}) continuing the SFT LoRA adapter, with the "
                   "SFT model as the reference"),
        ("preference data", f"{s.get('instructions')} instructions drawn from the SFT's own training pairs → "
                            f"{s.get('candidates')} candidates ({cfg.get('samples')} sampled from the SFT model"
                            + (" + the synthesized response" if cfg.get("include_reference") else "") + " each) → "
                            f"graded by {judge.get('judge_model')} → {s.get('pairs')} (chosen, rejected) pairs with "
                            f"grade margin ≥ {cfg.get('min_margin')}"),
        ("grade margins (margin: instructions)", s.get("margin_histogram")),
        ("DPO steps / learning rate", f"{s.get('dpo_steps')} / {cfg.get('learning_rate')}"),
        ("DPO loss (first → last step)", f"{_fmt(s.get('dpo_loss_first'))} → {_fmt(s.get('dpo_loss_last'))}"),
        ("held-out log p(chosen) − log p(rejected) (SFT → SFT+DPO)",
         f"{_fmt(before.get('logp_margin'))} → {_fmt(after.get('logp_margin'))}" if before and after else None)])


def _reinforce_section(rec: RunRecords) -> str:
    """GRPO after the SFT (or DPO): its rewards and what they did on held-out and trained prompts."""
    if not rec.reinforce:
        return ""
    s, cfg = rec.reinforce["stats"], rec.reinforce["output"].get("reinforce", {})
    judge = rec.reinforce["output"].get("eval", {})
    moved = []
    for kind, label in (("held_out", "held-out prompts"), ("trained", "trained prompts")):
        before, after = (s.get("before") or {}).get(kind), (s.get("after") or {}).get(kind)
        if before and after:
            moved.append((f"weighted reward on {label} (before → after)",
                          f"{_fmt(before['reward'])} → {_fmt(after['reward'])}"))
    return _facts([
        ("method", f"GRPO (TRL) continuing the {'DPO' if rec.prefer else 'SFT'} LoRA adapter, KL (beta "
                   f"{cfg.get('beta')}) to that adapter, {cfg.get('num_generations')} completions per prompt"),
        ("prompts", f"{s.get('prompts')} instructions from the SFT's own training pairs (+{s.get('held_out_prompts')} "
                    "held out)"),
        ("rewards (name × weight)", ", ".join(f"{n} × {w:g}" for n, w in (s.get("rewards") or {}).items())),
        ("judge", judge.get("judge_model") if "judge" in (s.get("rewards") or {}) else None),
        ("GRPO steps / learning rate", f"{s.get('steps')} / {cfg.get('learning_rate')}"),
        *moved])


def _eval_section(rec: RunRecords, diff: dict | None, chart: bool) -> list[str]:
    base, sft, tuned = rec.evals.get("base", {}), rec.evals.get("sft", {}), rec.evals.get("tuned", {})
    if not base and not tuned:
        return []
    runs = (base, sft, tuned) if sft else (base, tuned)  # after DPO or GRPO: base, SFT alone, the final model
    rows = []
    for key, metric in METRICS.items():
        if all(r.get(key) is None for r in runs):
            continue
        cells = [f"{_fmt(r[key])} [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]" if key == "mean_grade" and r.get(
            "ci95") else r.get(key) for r in runs]
        rows.append([metric.short, *cells])
    final = "+".join(["SFT", *(["DPO"] if rec.prefer else []), *(["GRPO"] if rec.reinforce else [])])
    out = [_table(["metric", "base", "SFT", final] if sft else ["metric", "base", "tuned"], rows)]
    if diff:
        out.append(f"Paired difference in mean grade (tuned − base) over {diff['n']} tasks graded in both: "
                   f"{_fmt(diff['diff'])}, 95% CI [{_fmt(diff['ci95'][0])}, {_fmt(diff['ci95'][1])}] "
                   f"(paired bootstrap).")
    if rec.pairwise:
        out.append(f"Head to head, each task's two answers judged in both orders by the same judge (a pair whose "
                   f"orders disagree is a tie): {pairwise_words(rec.pairwise)}.")
    report = tuned or base
    tasks = [t.split(":", 1)[0] + (f" ({Path(t.split(':', 1)[1]).name})" if ":" in t else "")
             for t in report.get("tasks", [])]
    out.append(_facts([("tasks", ", ".join(tasks) or None),
                       ("open-ended tasks graded (tuned)", f"{tuned['n_scored']} of {tuned['n_tasks']}"
                        if tuned.get("n_tasks") else None),
                       ("tuned model scored as", scored_as(tuned.get("model"))),
                       ("judge model", (report.get("judge") or {}).get("model")),
                       ("judge prompt version", report.get("prompt_version")),
                       ("grade intervals", "95% bootstrap CI" if report.get("ci95") else None)]))
    if any(r.get("partial") for r in (base, tuned)):
        out.append("Some judgements failed; grades are over the tasks that were graded.")
    if chart:
        out.append("![base vs tuned](eval.png)")
    return out + _published_section(base, tuned)


def _published_section(base: dict, tuned: dict) -> list[str]:
    """The evals beside the published figures their judge graded, and the tuned model's contamination check."""
    from ezoforge.eval import anchors, contamination

    groups = anchors.beside([(label, r.get("anchors") or []) for label, r in (("base", base), ("tuned", tuned))])
    checked = contamination.markdown_section(tuned.get("contamination") or base.get("contamination"))
    return (["### Beside published figures", *anchors.markdown_section(groups)] if groups else []) + (
        ["### Contamination check", *checked] if checked else [])


def usage(model_ref: str, system_prompt: str | None) -> str:
    def quote(text: str) -> str:  # a JSON string is a valid Python literal
        return json.dumps(text, ensure_ascii=False)

    messages = ([f'    {{"role": "system", "content": {quote(system_prompt)}}},'] if system_prompt else []) + \
               [f'    {{"role": "user", "content": {quote(USAGE_PROMPT)}}},']
    return "\n".join([
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("text-generation", model={quote(model_ref)})',
        "messages = [", *messages, "]",
        "out = pipe(messages, max_new_tokens=128, do_sample=False)",
        'print(out[0]["generated_text"][-1]["content"])',
        "```"])


def render(rec: RunRecords, title: str, model_ref: str, system_prompt: str | None, gguf: dict[str, str],
           diff: dict | None, chart: bool, made: list[tuple[str, str]] = ()) -> str:
    base = rec.base_model
    _, notice = licence(base)
    body = ["---", yaml.safe_dump(metadata(rec, list(gguf)), allow_unicode=True, sort_keys=False).strip(), "---", "",
            f"# {title}", "",
            ("A Japanese assistant model made with ezoforge the way the EZO models were made: instruction data "
             "synthesized from Japanese text, then supervised fine-tuning"
             + (", then DPO on pairs graded by its own evaluation judge" if rec.prefer else "")
             + (", then GRPO from named rewards" if rec.reinforce else "") + "." if rec.train else
             "A model exported with ezoforge (no training records were found beside it).")
            + (f" Base model: `{hub_id(base) or base}`." if base else ""), ""]
    if made:  # each stage in the words its command and the run report use
        body += ["## How it was made", "", *[f"- **{stage}**: {sentence}" for stage, sentence in made], ""]
    data = _data_section(rec)
    if data:
        body += ["## Data", "", *[p + "\n" for p in data]]
    method = _method_section(rec)
    if method:
        body += ["## Training", "", method, ""]
    preference = _preference_section(rec)
    if preference:
        body += ["### Preference tuning (SFT → DPO)", "", preference, ""]
    reinforce = _reinforce_section(rec)
    if reinforce:
        body += ["### Reinforcement (GRPO)", "", reinforce, ""]
    evals = _eval_section(rec, diff, chart)
    if evals:
        body += ["## Evaluation", "", *[p + "\n" for p in evals]]
    body += ["## Usage", "", usage(model_ref, system_prompt), ""]
    if system_prompt:
        body += [f"The system prompt above is the one the model was {'trained' if rec.train else 'exported'} with: "
                 f"「{system_prompt}」", ""]
    if gguf:
        first = next(iter(gguf.values()))
        body += ["### llama.cpp and Ollama", "",
                 "GGUF files in `gguf/` (tokenizer and chat template embedded): "
                 + ", ".join(f"`{f}` ({t})" for t, f in gguf.items()) + "; `gguf/Modelfile` sets Ollama's template, "
                 "system prompt and stop tokens.", "", "```sh",
                 f"llama-cli -m gguf/{first} -cnv" + (f" -sys {json.dumps(system_prompt, ensure_ascii=False)}"
                                                      if system_prompt else ""),
                 "ollama create my-model -f gguf/Modelfile && ollama run my-model", "```", ""]
    body += ["## Intended use and limits", "",
             "For Japanese chat and instruction following, and for research on tuning recipes. The model inherits "
             "the base model's knowledge, biases and failure modes; its tuning data was written by a model and "
             "filtered automatically, not reviewed by people, so answers can be fluent and wrong. It has not been "
             "evaluated for safety: check outputs before relying on them.", "",
             "## Licence", "", notice, ""]
    return "\n".join(body)


def eval_chart(rec: RunRecords) -> bytes | None:
    """Base vs tuned bars for each eval figure the runs have (mean grade with its 95% CI): report_kit's chart."""
    runs = [(name, rec.evals[name]) for name in ("base", "tuned") if rec.evals.get(name)]
    fig = metric_bars(runs, METRICS)
    return png_bytes(fig) if fig else None
