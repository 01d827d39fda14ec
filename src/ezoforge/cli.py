"""`ezo`: one subcommand per stage, plus run, validate and plan.

Each command parses its flags, folds them into the recipe (flags < --set overrides), and calls the
stage's `run`. Heavy imports happen inside the commands so `ezo --help` stays instant.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ezoforge.config import Recipe, dump_yaml, load_recipe
from ezoforge.errors import ConfigError, EzoError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ezoforge: turn a base LLM into a Japanese assistant (curate → synth → train → merge → eval).")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML to start from.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Dotted override, e.g. train.max_steps=10 (repeatable).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="HF id, local folder, .gguf file or bundled:smollm2-135m-instruct.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="PEFT adapter folder to apply.")]
TemplateOpt = Annotated[Optional[Path], typer.Option("--chat-template", help="Jinja chat template file, for models without one.")]
# Flags default to None: a flag overrides the recipe only when it is given.
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto (CUDA if present), cpu, cuda, cuda:1 … (default: the recipe's model.device).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto (CUDA bf16, CPU float32), float32, bfloat16, float16 (default: the recipe's model.dtype).")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="auto (nf4 only where the weights do not fit the device), none, nf4, int8: bitsandbytes (default: the recipe's model.quantize).")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt for a conversation without one (default: model.system_prompt, the EZO one).")]
NoSystemOpt = Annotated[bool, typer.Option("--no-system", help="Add no system prompt.")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Reply length (generation.max_new_tokens).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy (generation.temperature).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage: deletes its folder, even one done with these settings.")]


def _model_flags(model: str | None, chat_template: Path | None, device: str | None, dtype: str | None,
                 quantize: str | None = None) -> dict:
    """The model option group every model-loading command shares, as recipe keys."""
    return {"model.name": model, "model.chat_template": chat_template, "model.device": device, "model.dtype": dtype,
            "model.quantize": quantize}


# Flags whose name is not their key's last part (the rest are `--last-part`), for errors that name the flag.
_FLAG_NAMES = {"model.name": "--model", "synth.model": "--model", "eval.allow_partial": "--allow-partial"}


def _recipe(config: Path | None, overrides: list[str] | None, **flags: Any) -> Recipe:
    """The recipe (or defaults), then the flags given on the command line ("a.b" keys; None = not given), then
    --set overrides."""
    return load_recipe(config, overrides, flags, _FLAG_NAMES)


def _system(system: str | None, no_system: bool, recipe: Recipe) -> str | None:
    if system is not None and no_system:
        raise ConfigError("--system and --no-system contradict each other")
    if no_system:
        return None
    return system if system is not None else recipe.model.system_prompt


def _load(recipe: Recipe, adapter: Path | None):
    from ezoforge.models import load

    m = recipe.model
    with console.status(f"loading {m.name}…"):
        loaded = load(m.name, adapter, m.device, m.dtype, m.chat_template, quantize=m.quantize)
    quantized = f" as {loaded.quantize}" if loaded.quantize != "none" else ""
    console.print(f"[dim]loaded {loaded.name}{quantized} on {loaded.device} in {loaded.load_seconds:.1f} s[/dim]")
    return loaded


@app.command()
def generate(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One prompt; the reply is printed.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help='JSONL of {"id", "prompt"} (batch mode).')] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help='JSONL of {"id", "prompt", "answer"} (batch mode).')] = None,
    system: SystemOpt = None,
    no_system: NoSystemOpt = False,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the assistant's reply to --prompt, or answer every line of --input into --out."""
    from ezoforge.infer.generate import Generator, Sampling, build_messages, generate_file

    if (prompt is None) == (input is None):
        raise EzoError("give exactly one of --prompt or --input")
    if input is not None and out is None:
        raise EzoError("--input needs --out")
    recipe = _recipe(config, set_, **_model_flags(model, chat_template, device, dtype, quantize), **{
        "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature,
        "generation.top_p": top_p, "generation.seed": seed, "generation.batch_size": batch_size})
    g = recipe.generation
    sampling = Sampling.from_config(g)
    sys_prompt = _system(system, no_system, recipe)
    gen = Generator(_load(recipe, adapter))
    if prompt is not None:
        print(gen.complete([build_messages(prompt, sys_prompt)], sampling)[0].text)
        return
    from ezoforge.models import model_identity

    m = recipe.model
    identity = model_identity(m.name, adapter, m.dtype, m.device, m.chat_template, m.quantize)
    n = generate_file(gen, input, out, sys_prompt, sampling, g.batch_size, identity)
    console.print(f"wrote {n} answers to {out}")


@app.command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    no_system: NoSystemOpt = False,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Interactive multi-turn chat, streamed. Commands: /reset, /system TEXT, /exit."""
    from ezoforge.infer.chat import repl
    from ezoforge.infer.generate import Generator, Sampling

    recipe = _recipe(config, set_, **_model_flags(model, chat_template, device, dtype, quantize), **{
        "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature})
    sys_prompt = _system(system, no_system, recipe)
    repl(Generator(_load(recipe, adapter)), sys_prompt, Sampling.from_config(recipe.generation))


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    host: Annotated[str, typer.Option("--host", help="Bind address (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on.")] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Env var holding the bearer key /v1/* requires.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="Model id clients use (default: --model).")] = None,
    system: SystemOpt = None,
    no_system: NoSystemOpt = False,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Default reply length (default: generation.max_new_tokens).")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Requests decoded together (serve.max_batch).")] = None,
    max_queue: Annotated[Optional[int], typer.Option("--max-queue", help="Requests waiting beyond the batch; more get 429 (serve.max_queue).")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option("--max-body-bytes", help="Larger request bodies get 413 (serve.max_body_bytes).")] = None,
    request_timeout: Annotated[Optional[float], typer.Option("--request-timeout", help="Seconds a request may take, queueing included (serve.request_timeout).")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """OpenAI-compatible server: POST /v1/chat/completions (plain and SSE), GET /v1/models, GET /health."""
    from ezoforge.infer.generate import Generator
    from ezoforge.infer.serve import api_key_from_env
    from ezoforge.infer.serve import serve as run_server

    recipe = _recipe(config, set_, **_model_flags(model, chat_template, device, dtype, quantize), **{
        "generation.max_new_tokens": max_tokens, "serve.max_batch": max_batch, "serve.max_queue": max_queue,
        "serve.max_body_bytes": max_body_bytes, "serve.request_timeout": request_timeout})
    from ezoforge.models import check_model

    api_key_from_env(api_key_env)  # everything cheap fails before the slow model load
    sys_prompt = _system(system, no_system, recipe)
    check_model(recipe.model.name, adapter, recipe.model.device, recipe.model.chat_template, recipe.model.quantize)
    _port_is_free(host, port)
    gen = Generator(_load(recipe, adapter))
    run_server(gen, served_model_name or recipe.model.name, host, port, api_key_env,
               sys_prompt, recipe.generation.max_new_tokens, recipe.serve)


def _port_is_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise EzoError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                           "is another server running? pick another --port") from None


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None) -> None:
    """Load a recipe and print it resolved, or fail naming the bad key."""
    print(dump_yaml(load_recipe(recipe, set_)), end="")


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None,
        force: Annotated[Optional[list[str]], typer.Option(
            "--force", help="Redo: `--force` the whole recipe, `--force STAGE` (repeatable) that stage and the ones "
                            "after it. Deletes the folders it redoes.")] = None) -> None:
    """Run the recipe's stages in order into its workdir, skipping stages already done with the same config."""
    from ezoforge.pipeline import run_recipe

    run_recipe(load_recipe(recipe, set_), recipe, force=force or [])


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None,
         gpu: Annotated[str, typer.Option("--gpu", help="Card to estimate for: h100, h200, a100-80gb, a100-40gb, l40s, l4, rtx4090.")] = "h100",
         ram: Annotated[float, typer.Option("--ram", min=1, help="Host memory in GiB the stages may use.")] = 64,
         as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False) -> None:
    """Estimate a run before starting it: each stage's GPU memory, RAM, disk and hours on the card, and whether
    it fits (a stage that does not names the setting that would make it fit)."""
    import json

    from ezoforge.plan import CARDS, plan as make_plan, print_plan

    if gpu not in CARDS:
        raise EzoError(f"--gpu {gpu}: unknown card (known: {', '.join(CARDS)})")
    result = make_plan(load_recipe(recipe, set_), gpu, ram_gib=ram)
    print(json.dumps(result, indent=2)) if as_json else print_plan(result)


eval_app = typer.Typer(help="Evaluate a model (ELYZA-tasks-100 with an LLM judge, chrF, JCommonsenseQA, perplexity); "
                            "`ezo eval compare DIR DIR…` puts runs side by side.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_(
    ctx: typer.Context,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", "-t", help="SPEC[,SPEC…]: elyza100[:PATH], jcqa[:PATH], mt-bench-ja:PATH, ppl:PATH.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (answers, judgements, report).")] = None,
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible base URL, or `local` to serve --judge-model in-process.")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="Judge model name (with `local`: a model spec).")] = None,
    judge_api_key_env: Annotated[Optional[str], typer.Option("--judge-api-key-env", help="Env var holding the judge's API key.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="First N items of each task.")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", help="Judge requests in flight.")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Report a mean over graded tasks even if some judgements failed.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer, judge and score a model into --out (report.json, report.html)."""
    if ctx.invoked_subcommand is not None:
        return
    from ezoforge.errors import ConfigError
    from ezoforge.eval.run import run as run_eval

    recipe = _recipe(config, set_, **_model_flags(model, chat_template, device, dtype, quantize), **{
        "eval.tasks": tasks.split(",") if tasks else None, "eval.judge_url": judge_url,
        "eval.judge_model": judge_model, "eval.judge_api_key_env": judge_api_key_env, "eval.limit": limit,
        "eval.concurrency": concurrency, "eval.allow_partial": allow_partial or None,
        "eval.generation.max_new_tokens": max_new_tokens})
    if out is None:
        raise ConfigError("ezo eval needs --out DIR")
    report = run_eval(recipe, out, adapter, force)
    console.print(f"[bold]{report['status']}[/bold] · mean grade {report['mean_grade']} (95% CI {report['ci95']}) · "
                  f"{report['n_scored']} verdicts over {report['n_tasks']} tasks · chrF {report['chrf']} · "
                  f"accuracy {report['accuracy']} · perplexity {report['perplexity']} → {out / 'report.html'}",
                  highlight=False)


@eval_app.command("compare")
def eval_compare(
    dirs: Annotated[list[Path], typer.Argument(help="Eval output folders; the first is the baseline.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write compare.json and compare.html here.")] = None,
    allow_different_judges: Annotated[bool, typer.Option(
        "--allow-different-judges", help="Show runs judged by different judges (as served) or judge prompts side by "
                                         "side, marked and unpaired, instead of refusing.")] = False,
) -> None:
    """Runs side by side: mean grade with 95% CI, paired bootstrap difference vs the first, chrF, accuracy, perplexity."""
    from rich.table import Table

    from ezoforge.eval.eval_report import COMPARE_COLUMNS, DIFFERENT_JUDGES, compare_rows
    from ezoforge.eval.run import compare

    result = compare(dirs, out, allow_different_judges)
    mark = f" · {DIFFERENT_JUDGES}" if result["different_judges"] else ""
    table = Table(*COMPARE_COLUMNS, title=f"baseline: {result['baseline']}{mark}")
    for row in compare_rows(result):
        table.add_row(*("–" if v is None else str(v) for v in row))
    Console().print(table)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if out is not None:
        console.print(f"wrote {out / 'compare.html'}")


@app.command()
def curate(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Inputs: .xml/.xml.bz2 (MediaWiki export), .parquet, .jsonl/.jsonl.gz, folders or globs "
             "(default: curate.inputs from the recipe).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data/, rejected/, stats.json, DONE).")] = ...,
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="Parallel tasks.")] = None,
    on_error: Annotated[Optional[str], typer.Option("--on-error", help="fail (default) or skip: bad rows go to rejected/.")] = None,
    force: ForceOpt = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="Finish even when no document is kept.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Extract clean, deduplicated Japanese documents from Wikipedia dumps and FineWeb-style web text."""
    from ezoforge.curate.run import run as run_curate

    recipe = _recipe(config, set_, **{"curate.workers": workers, "curate.on_error": on_error})
    stats = run_curate(recipe, inputs or [], out, force=force, allow_empty=allow_empty)
    removed = ", ".join(f"{k} {v}" for k, v in stats["removed_by_filter"].items()) or "none"
    console.print(f"kept {stats['docs_out']} of {stats['docs_in']} documents in {out / 'data'} (removed: {removed})")


@app.command()
def synth(
    input: Annotated[Path, typer.Argument(help="A curate output folder, or JSONL/Parquet file(s) with `text` (and `id`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data/, rejected/, stats.json, DONE).")] = ...,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model spec, or the served model name with --backend openai (default: the recipe's).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="transformers, vllm or openai.")] = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Env var holding the server's API key.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="prompted (any chat model) or synthesizer (Instruction Pre-Training format).")] = None,
    pairs_per_doc: Annotated[Optional[int], typer.Option("--pairs-per-doc", help="Pairs asked for per passage (prompted mode).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="Draw N documents: a seeded mix of the sources (synth.mix).")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", help="Requests in flight (openai backend).")] = None,
    force: ForceOpt = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="Finish even when no pair is kept.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Synthesize instruction/response pairs from documents, resumably (completed requests are never resent)."""
    from ezoforge.synth.run import run as run_synth

    recipe = _recipe(config, set_, **{
        "synth.model": model, "synth.backend": backend, "synth.base_url": base_url, "synth.api_key_env": api_key_env,
        "synth.mode": mode, "synth.pairs_per_doc": pairs_per_doc, "synth.limit": limit,
        "synth.concurrency": concurrency})
    stats = run_synth(recipe, input, out, force=force, allow_empty=allow_empty)
    console.print(f"{stats['pairs']} pairs from {stats['documents']} documents ({stats['requests']} requests, "
                  f"parse rate {stats['parse_rate']:.0%}, {stats['errors']} failed) in {out / 'data'}")
    if stats["errors"]:
        console.print(f"[yellow]{stats['errors']} request(s) failed[/yellow] — rerun the same command to retry only "
                      "those:", highlight=False)
        for reason, n in stats.get("error_reasons", {}).items():
            console.print(f"  {n}× {escape(reason)}", highlight=False)


@app.command()
def train(
    inputs: Annotated[list[Path], typer.Argument(help="A synth output folder, or JSONL/Parquet with instruction+response (+context) or messages.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (adapter/, checkpoints/, metrics.jsonl, loss.png, DONE).")] = ...,
    model: ModelOpt = None,
    qlora: Annotated[Optional[bool], typer.Option("--qlora/--no-qlora", help="4-bit NF4 base, or an error if it cannot train here (default: the recipe's train.qlora, auto = 4-bit on CUDA, LoRA on a CPU).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the data (instead of --max-steps).")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint (and eval) every N steps.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    chat_template: TemplateOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Instruction-tune a LoRA/QLoRA adapter with assistant-only loss; rerun the same command to resume after a kill."""
    from ezoforge.train.run import run as run_train

    recipe = _recipe(config, set_, **_model_flags(model, chat_template, None, None), **{"train.qlora": qlora,
        "train.max_steps": max_steps, "train.epochs": epochs, "train.save_every": save_every, "train.seed": seed})
    stats = run_train(recipe, inputs, out, force=force)
    if stats:
        console.print(f"{stats['steps']} steps · loss {stats['train_loss_first']} → {stats['train_loss_last']} · "
                      f"eval loss {stats['eval_loss']} · {stats['tokens_per_s']} tok/s → {out / 'adapter'}",
                      highlight=False)


@app.command()
def prefer(
    train_dir: Annotated[Path, typer.Argument(help="A finished `ezo train` folder: its adapter is the SFT model, its inputs the instructions.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data/pairs.jsonl, candidates, verdicts, adapter/, DONE).")] = ...,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Answers sampled per instruction (prefer.samples).")] = None,
    min_margin: Annotated[Optional[float], typer.Option("--min-margin", help="Smallest grade gap between chosen and rejected (prefer.min_margin).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Instructions drawn from the SFT's pairs (prefer.limit).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="DPO optimizer steps (prefer.max_steps).")] = None,
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible judge, or local (eval.judge_url).")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="The judge's model (eval.judge_model).")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Preference pairs from the SFT model's own answers, graded by the judge, then DPO continuing the SFT adapter."""
    from ezoforge.prefer.run import run as run_prefer

    recipe = _recipe(config, set_, **{"prefer.samples": samples, "prefer.min_margin": min_margin,
                                      "prefer.limit": limit, "prefer.max_steps": max_steps,
                                      "eval.judge_url": judge_url, "eval.judge_model": judge_model})
    stats = run_prefer(recipe, train_dir, out, force=force)
    before, after = stats["held_out_before"], stats["held_out_after"]
    held = f" · held-out log-prob margin {before['logp_margin']} → {after['logp_margin']}" if before and after else ""
    console.print(f"{stats['pairs']} pairs of {stats['instructions']} instructions (margins {stats['margin_histogram']})"
                  f" · DPO {stats['dpo_steps']} steps, loss {stats['dpo_loss_first']} → {stats['dpo_loss_last']}{held}"
                  f" → {out / 'adapter'}", highlight=False)


@app.command()
def merge(
    train_dir: Annotated[Path, typer.Argument(help="A finished `ezo train` output folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the standalone merged model.")] = ...,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="bf16 (default), float32, float16, or auto (the base's).")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Merge the adapter into a full-precision copy of its base and save a model plain transformers and vLLM load."""
    from ezoforge.train.merge import run as run_merge

    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    recipe = _recipe(config, set_, **{"merge.dtype": aliases.get(dtype, dtype)})
    stats = run_merge(train_dir, out, recipe.merge.dtype, force=force)
    console.print(f"merged {stats['base']} + {train_dir / 'adapter'} → {out} ({stats['dtype']})", highlight=False)


def _force_takes_optional_stage(argv: list[str]) -> list[str]:
    """`ezo run R --force` means every stage: give the bare flag its value, since click options cannot have an
    optional one. `--force WORD` names a stage unless WORD is an option or the recipe file."""
    if "run" not in argv[:2]:
        return argv
    from ezoforge.pipeline import ALL

    def bare(i: int) -> bool:
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        return nxt is None or nxt.startswith("-") or nxt.endswith((".yaml", ".yml")) or Path(nxt).is_file()

    return [f"--force={ALL}" if a == "--force" and bare(i) else a for i, a in enumerate(argv)]


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines through rich on stderr (`ezo run`'s stage processes call this too)."""
    logging.basicConfig(level=level, format="%(message)s", handlers=[_rich_handler()])
    for noisy in ("httpx", "httpx2", "urllib3", "datatrove"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    sys.argv[1:] = _force_takes_optional_stage(sys.argv[1:])
    setup_logging()
    try:
        app()
    except EzoError as e:
        console.print("[bold red]error:[/bold red]", escape(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume")
        sys.exit(130)
    except Exception:  # not a user's mistake (those are EzoErrors): show it, keep it, say so
        import traceback

        from ezoforge.models import cache_root

        log = cache_root() / "logs" / f"ezo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"ezo {' '.join(sys.argv[1:])}\n{traceback.format_exc()}", encoding="utf-8")
        traceback.print_exc()
        console.print(f"[bold red]internal error[/bold red] — a bug in ezoforge, not in your input; the traceback "
                      f"is above and in {log} (please attach it to an issue)", highlight=False, soft_wrap=True)
        sys.exit(70)


def _rich_handler() -> logging.Handler:
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, show_time=False)


# ---------------------------------------------------------------- export and push

@app.command()
def export(
    merged: Annotated[Path, typer.Argument(help="A merged model folder (`ezo merge` output).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: `export` beside MERGED).")] = None,
    gguf: Annotated[Optional[list[str]], typer.Option("--gguf", help="Also write a GGUF (+ Ollama Modelfile): f16 or q8_0 (repeatable).")] = None,
    repo: Annotated[Optional[str], typer.Option("--repo", help="USER/NAME the card's usage snippet loads (default: the output folder).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a folder made with other settings.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """A folder ready to publish: weights, tokenizer, model card (README.md) from the run's records, optional GGUF."""
    from ezoforge.export.run import run as run_export

    recipe = _recipe(config, set_, **{"export.gguf": gguf, "export.repo": repo})
    out = out or merged.parent / "export"
    stats = run_export(merged, out, recipe.export, recipe.model.system_prompt, force=force)
    files = "".join(f", gguf/{g['file']}" for g in stats["gguf"])
    console.print(f"exported {merged} → {out} (README.md{', eval.png' if stats['chart'] else ''}"
                  f"{files + ', gguf/Modelfile' if files else ''})", highlight=False)


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="An `ezo export` output folder.")],
    repo: Annotated[str, typer.Option("--repo", help="Hugging Face repo id, USER/NAME.")] = ...,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be sent; send nothing.")] = False,
) -> None:
    """Upload an exported folder to the Hugging Face Hub (token from HF_TOKEN only; it is never written)."""
    from ezoforge.export.push import push as push_folder

    result = push_folder(folder, repo, private, dry_run)
    for name, size in result["files"]:
        print(f"{size:>14,}  {name}")
    sys.stdout.flush()  # the listing before the summary (stderr)
    verb = "would send" if dry_run else "sent"
    console.print(f"{verb} {len(result['files'])} files ({result['bytes']:,} bytes) to "
                  f"{'private ' if private else ''}model repo {repo}"
                  + (f": {result['url']}" if result.get("url") else ""), highlight=False)
