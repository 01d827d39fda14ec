"""`ezo`: one subcommand per stage, plus run, validate and plan.

Each command parses its flags, folds them into the recipe (flags < --set overrides), and calls the
stage's `run`. Heavy imports happen inside the commands so `ezo --help` stays instant.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ezoforge.config import Recipe, dump_yaml
from ezoforge.errors import ConfigError, EzoError, MachineFault, free_bytes, machine_fault, size
from ezoforge.eval.tasks import SPEC_HELP
from ezoforge.logs import console, setup_logging
from ezoforge.stages import load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ezoforge: turn a base LLM into a Japanese assistant (curate → synth → train → merge → eval).")
log = logging.getLogger("ezoforge.cli")


def _version(shown: bool) -> None:
    if shown:
        from ezoforge.records import ezoforge_version

        print(f"ezoforge {ezoforge_version()}")
        raise typer.Exit()


@app.callback()
def _ezo(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print ezoforge's version and exit.")] = False) -> None:
    """ezoforge: turn a base LLM into a Japanese assistant (curate → synth → train → merge → eval)."""

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML to start from.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Dotted override, e.g. train.max_steps=10 (repeatable).")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="PEFT adapter folder to apply.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt for a conversation without one (default: model.system_prompt, the EZO one).")]
NoSystemOpt = Annotated[bool, typer.Option("--no-system", help="Add no system prompt.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage: deletes its folder, even one done with these settings.")]


@dataclass(frozen=True)
class Flag:
    """An option that sets one recipe key, declared once for every command that takes it. Not given (None), the
    recipe's value stands; a --set override beats it."""

    key: str
    names: tuple[str, ...]
    type: Any
    help: str = ""
    parse: Callable[[Any], Any] | None = None  # the given value as the recipe takes it

    @property
    def param(self) -> str:
        return self.key.replace(".", "__")

    @property
    def flag(self) -> str:
        """The name errors use."""
        return self.names[0].split("/")[0]

    def annotation(self) -> Any:
        return Annotated[Optional[self.type], typer.Option(*self.names, help=f"{self.help} ({self.key})".lstrip())]

    def value(self, given: Any) -> Any:
        return given if given is None or self.parse is None else self.parse(given)


def recipe_options(*flags: Flag):
    """A command that works from the recipe: it takes `flags`, --config and --set besides its own options, and is
    called with `recipe`: the recipe file (or the defaults), then the flags given, then the --set overrides."""
    def wrap(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "recipe"]
        added = [(f.param, None, f.annotation()) for f in flags] + [("config", None, ConfigOpt), ("set_", None, SetOpt)]

        @functools.wraps(command)
        def with_recipe(**given: Any):
            values = {f.key: f.value(given.pop(f.param)) for f in flags}
            recipe = load_recipe(given.pop("config"), given.pop("set_"), values, {f.key: f.flag for f in flags})
            with plan_figure_beside_faults(recipe):
                return command(recipe=recipe, **given)

        with_recipe.__signature__ = inspect.Signature(
            own + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                   for name, default, annotation in added])
        return with_recipe
    return wrap


@contextlib.contextmanager
def plan_figure_beside_faults(recipe: Recipe):
    """A machine fault raised in the block, with `ezo plan`'s figure for what ran out beside it."""
    try:
        yield
    except Exception as e:
        fault = machine_fault(e)
        if fault is None:
            raise
        from ezoforge.plan import fault_figure

        figure = fault_figure(recipe, fault.stage, fault.resource)
        if figure is None and fault is e:
            raise
        raise MachineFault(f"{fault}" + (f"; {figure}" if figure else ""), fault.resource, fault.stage) from e


# Flags more than one command takes.
MODEL_FLAGS = (  # every command that loads recipe.model
    Flag("model.name", ("--model", "-m"), str, "HF id, local folder, .gguf file or bundled:smollm2-135m-instruct."),
    Flag("model.chat_template", ("--chat-template",), Path, "Jinja chat template file, for models without one."),
    Flag("model.device", ("--device",), str, "auto (CUDA if present), cpu, cuda, cuda:1 …"),
    Flag("model.dtype", ("--dtype",), str, "auto (CUDA bf16, CPU float32), float32, bfloat16, float16."),
    Flag("model.quantize", ("--quantize",), str,
         "auto (nf4 only where the weights do not fit the device), none, nf4, int8: bitsandbytes."))
ENGINE = Flag("model.backend", ("--backend",), str,
              "transformers, llamacpp (llama.cpp on the CPU), or auto: llamacpp where it can run the model.")
MAX_NEW_TOKENS = Flag("generation.max_new_tokens", ("--max-new-tokens",), int, "Reply length.")
TEMPERATURE = Flag("generation.temperature", ("--temperature",), float, "0 = greedy.")
JUDGE_URL = Flag("eval.judge_url", ("--judge-url",), str,
                 "OpenAI-compatible base URL, or `local` to serve --judge-model in-process.")
JUDGE_MODEL = Flag("eval.judge_model", ("--judge-model",), str, "Judge model name (with `local`: a model spec).")
MERGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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


def _engine(recipe: Recipe, adapter: Path | None, sequences: int):
    """The chat engine model.backend names (auto: llama.cpp where it can run the model), and its name."""
    from ezoforge.infer.engines import choose, open_engine

    m = recipe.model
    engine = choose(m.backend, "model.backend", m.name, adapter, m.device, m.quantize, m.llamacpp)
    gen = open_engine(engine, m.name, m.chat_template, m.llamacpp, sequences, lambda: _load(recipe, adapter))
    if engine == "llamacpp":
        console.print(f"[dim]llama.cpp runs {m.name} ({gen.engine.sequences} sequences at once)[/dim]")
    return gen, engine


@app.command()
@recipe_options(*MODEL_FLAGS, ENGINE, MAX_NEW_TOKENS, TEMPERATURE, Flag("generation.top_p", ("--top-p",), float),
                Flag("generation.seed", ("--seed",), int), Flag("generation.batch_size", ("--batch-size",), int))
def generate(
    recipe: Recipe,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One prompt; the reply is printed.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help='JSONL of {"id", "prompt"} (batch mode).')] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help='JSONL of {"id", "prompt", "answer"} (batch mode).')] = None,
    system: SystemOpt = None,
    no_system: NoSystemOpt = False,
) -> None:
    """Print the assistant's reply to --prompt, or answer every line of --input into --out."""
    from ezoforge.infer.generate import Sampling, build_messages, generate_file

    if (prompt is None) == (input is None):
        raise EzoError("give exactly one of --prompt or --input")
    if input is not None and out is None:
        raise EzoError("--input needs --out")
    g = recipe.generation
    sampling = Sampling.from_config(g)
    sys_prompt = _system(system, no_system, recipe)
    gen, engine = _engine(recipe, adapter, g.batch_size)
    if prompt is not None:
        print(gen.complete([build_messages(prompt, sys_prompt)], sampling)[0].text)
        return
    from ezoforge.infer.engines import identity
    from ezoforge.models import model_identity

    m = recipe.model
    model = identity(engine, model_identity(m.name, adapter, m.dtype, m.device, m.chat_template, m.quantize))
    n = generate_file(gen, input, out, sys_prompt, sampling, g.batch_size, model)
    console.print(f"wrote {n} answers to {out}")


@app.command()
@recipe_options(*MODEL_FLAGS, ENGINE, MAX_NEW_TOKENS, TEMPERATURE)
def chat(recipe: Recipe, adapter: AdapterOpt = None, system: SystemOpt = None, no_system: NoSystemOpt = False) -> None:
    """Interactive multi-turn chat, streamed. Commands: /reset, /system TEXT, /exit."""
    from ezoforge.infer.chat import repl
    from ezoforge.infer.generate import Sampling

    sys_prompt = _system(system, no_system, recipe)
    repl(_engine(recipe, adapter, 1)[0], sys_prompt, Sampling.from_config(recipe.generation))


@app.command()
@recipe_options(*MODEL_FLAGS, ENGINE, Flag("generation.max_new_tokens", ("--max-tokens",), int, "Default reply length."),
                Flag("serve.max_batch", ("--max-batch",), int, "Requests decoded together."),
                Flag("serve.max_queue", ("--max-queue",), int, "Requests waiting beyond the batch; more get 429."),
                Flag("serve.max_body_bytes", ("--max-body-bytes",), int, "Larger request bodies get 413."),
                Flag("serve.request_timeout", ("--request-timeout",), float,
                     "Seconds a request may take, queueing included."))
def serve(
    recipe: Recipe,
    adapter: AdapterOpt = None,
    host: Annotated[str, typer.Option("--host", help="Bind address (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on.")] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Env var holding the bearer key /v1/* requires.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="Model id clients use (default: --model).")] = None,
    system: SystemOpt = None,
    no_system: NoSystemOpt = False,
    open_without_key: Annotated[bool, typer.Option(
        "--open-without-key", help="Listen beyond loopback (--host) without an API key: anyone who reaches the port "
                                   "can use the model. Refused unless given.")] = False,
) -> None:
    """OpenAI-compatible server: POST /v1/chat/completions (plain and SSE), GET /v1/models, GET /health."""
    from ezoforge.infer.serve import api_key_from_env, check_exposure
    from ezoforge.infer.serve import serve as run_server
    from ezoforge.models import check_model

    check_exposure(host, api_key_env, open_without_key)
    api_key_from_env(api_key_env)  # everything cheap fails before the slow model load
    sys_prompt = _system(system, no_system, recipe)
    check_model(recipe.model.name, adapter, recipe.model.device, recipe.model.chat_template, recipe.model.quantize)
    _port_is_free(host, port)
    gen, _ = _engine(recipe, adapter, recipe.serve.max_batch)
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
                            "after it. Deletes the folders it redoes.")] = None,
        smoke: Annotated[bool, typer.Option(
            "--smoke", help="Every stage at a few documents, steps and tasks, on the recipe's model, card and "
                            "engines, into WORKDIR-smoke; then each stage's peak memory and rate beside `ezo plan`'s "
                            "(smoke.json). Run it first.")] = False,
        ram: Annotated[float, typer.Option("--ram", min=1, help="With --smoke: the host memory in GiB the plan "
                                                                "compares against.")] = 64,
        ignore_disk_plan: Annotated[bool, typer.Option(
            "--ignore-disk-plan", help="Start even where `ezo plan` says the disk cannot hold what the stages still "
                                       "to run will write.")] = False) -> None:
    """Run the recipe's stages in order into its workdir, skipping stages already done with the same config."""
    resolved = load_recipe(recipe, set_)
    with plan_figure_beside_faults(resolved):
        if smoke:
            from ezoforge.smoke import run_smoke

            run_smoke(resolved, recipe, ram, force=force or [])
            return
        from ezoforge.pipeline import run_recipe

        check_disk(resolved, ignore_disk_plan)
        run_recipe(resolved, recipe, force=force or [])


def check_disk(recipe: Recipe, ignore: bool) -> None:
    """Refuse a run whose remaining stages `ezo plan` says the workdir's disk cannot hold, with both figures."""
    from ezoforge.plan import GIB, disk_to_run

    try:
        need, unsized = disk_to_run(recipe)
    except EzoError:
        raise  # the recipe's own mistake (a model that cannot be found): named now, before any stage
    except Exception as e:  # a plan this model's shapes defeat must not stop the run: its stages check themselves
        log.warning("disk: not checked before the run, `ezo plan` could not size it (%s: %s)", type(e).__name__, e)
        return
    need, free, folder = need * GIB, free_bytes(recipe.workdir), Path(recipe.workdir).absolute()
    unknown = f" (not counting {', '.join(unsized)}: the plan cannot size them yet)" if unsized else ""
    if need <= free:
        log.info("disk: the stages to run write about %s%s; %s free at %s", size(need), unknown, size(free), folder)
        return
    message = (f"the disk cannot hold this run: ezo plan puts what the stages still to run write at {size(need)}"
               f"{unknown}, and {size(free)} is free at {folder}")
    if ignore:
        log.warning("%s; starting anyway (--ignore-disk-plan)", message)
        return
    raise MachineFault(f"{message}. Free some space or give another workdir, or pass --ignore-disk-plan to start "
                       "anyway (the plan is an estimate).", "disk")


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None,
         gpu: Annotated[str, typer.Option("--gpu", help="Card to estimate for: h100, h200, a100-80gb, a100-40gb, l40s, l4, rtx4090.")] = "h100",
         ram: Annotated[float, typer.Option("--ram", min=1, help="Host memory in GiB the stages may use.")] = 64,
         num_gpus: Annotated[int, typer.Option("--num-gpus", min=1, help="Cards of --gpu's kind: training sharded "
                                               "with FSDP, an engine per card set for synth.")] = 1,
         as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False) -> None:
    """Estimate a run before starting it: each stage's GPU memory, RAM, disk and hours on the card, and whether
    it fits (a stage that does not names the setting that would make it fit)."""
    import json

    from ezoforge.plan import CARDS, plan as make_plan, print_plan

    if gpu not in CARDS:
        raise EzoError(f"--gpu {gpu}: unknown card (known: {', '.join(CARDS)})")
    result = make_plan(load_recipe(recipe, set_), gpu, ram_gib=ram, num_gpus=num_gpus)
    print(json.dumps(result, indent=2)) if as_json else print_plan(result)


eval_app = typer.Typer(help="Evaluate a model (ELYZA-tasks-100 with an LLM judge, chrF, JCommonsenseQA, perplexity); "
                            "`ezo eval compare DIR DIR…` puts runs side by side.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
@recipe_options(*MODEL_FLAGS,
                Flag("eval.tasks", ("--tasks", "-t"), str,
                     f"SPEC[,SPEC…]: {SPEC_HELP}.",
                     parse=lambda tasks: tasks.split(",")),
                JUDGE_URL, JUDGE_MODEL,
                Flag("eval.judge_api_key_env", ("--judge-api-key-env",), str, "Env var holding the judge's API key."),
                Flag("eval.limit", ("--limit",), int, "First N items of each task."),
                Flag("eval.concurrency", ("--concurrency",), int, "Judge requests in flight."),
                Flag("eval.allow_partial", ("--allow-partial",), bool,
                     "Report a mean over graded tasks even if some judgements failed."),
                Flag("eval.generation.max_new_tokens", ("--max-new-tokens",), int, "Reply length."))
def eval_(
    ctx: typer.Context,
    recipe: Recipe,
    adapter: AdapterOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (answers, judgements, report).")] = None,
    force: ForceOpt = False,
) -> None:
    """Answer, judge and score a model into --out (report.json, report.html)."""
    if ctx.invoked_subcommand is not None:
        return
    from ezoforge.eval.run import run as run_eval
    from ezoforge.eval.run import summary

    if out is None:
        raise ConfigError("ezo eval needs --out DIR")
    report = run_eval(recipe, out, adapter, force)
    console.print(f"[bold]{report['status']}[/bold] · {summary(out)} → {out / 'report.html'}", highlight=False)


@eval_app.command("compare")
@recipe_options(JUDGE_URL, JUDGE_MODEL)
def eval_compare(
    recipe: Recipe,
    dirs: Annotated[list[Path], typer.Argument(help="Eval output folders; the first is the baseline.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write compare.json and compare.html here "
                                                "(with --pairwise: pairwise.json and verdicts.jsonl).")] = None,
    allow_different_judges: Annotated[bool, typer.Option(
        "--allow-different-judges", help="Show runs judged by different judges (as served) or judge prompts side by "
                                         "side, marked and unpaired, instead of refusing.")] = False,
    pairwise: Annotated[bool, typer.Option(
        "--pairwise", help="Ask the judge which of two answers to each task is better, in both orders (a pair whose "
                           "orders disagree is a tie): wins, ties, losses and the win rate of each run over the "
                           "first.")] = False,
    force: ForceOpt = False,
) -> None:
    """Runs side by side: mean grade with 95% CI, paired bootstrap difference vs the first, chrF, accuracy, perplexity."""
    from rich.table import Table

    from ezoforge.eval.compare import compare
    from ezoforge.eval.eval_report import COMPARE_COLUMNS, DIFFERENT_JUDGES, compare_rows

    if pairwise:
        from ezoforge.eval.pairwise import run as run_pairwise

        if out is None:
            raise ConfigError("--pairwise needs --out DIR (its verdicts are a stage folder)")
        _print_pairwise(run_pairwise(dirs, recipe.eval, out, force=force))
        return
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


def _print_pairwise(result: dict) -> None:
    from rich.table import Table

    table = Table("against the baseline", "pairs", "wins", "ties", "losses", "win rate [95% CI]", "orders disagree",
                  title=f"pairwise: baseline {result['baseline']} · judge {' + '.join(result['judge']['served']) or result['judge']['model']}")
    for r in result["against"]:
        ci = "–" if r["ci95"] is None else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        table.add_row(r["other"], str(r["pairs"]), str(r["wins"]), str(r["ties"]), str(r["losses"]),
                      f"{r['win_rate']} {ci}", str(r["disagreements"]))
    console.print(table)
    for r in result["against"]:
        console.print(f"{r['other']}: win rate {r['win_rate']} over {r['pairs']} pairs"
                      + (f" ({r['failed']} without a verdict)" if r["failed"] else ""), highlight=False)


@app.command()
@recipe_options(Flag("curate.workers", ("--workers", "-w"), int, "Parallel tasks."),
                Flag("curate.on_error", ("--on-error",), str, "fail (default) or skip: bad rows go to rejected/."))
def curate(
    recipe: Recipe,
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Inputs: .xml/.xml.bz2 (MediaWiki export), .parquet, .jsonl/.jsonl.gz, folders or globs "
             "(default: curate.inputs from the recipe).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data/, rejected/, stats.json, DONE).")] = ...,
    force: ForceOpt = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="Finish even when no document is kept.")] = False,
) -> None:
    """Extract clean, deduplicated Japanese documents from Wikipedia dumps and FineWeb-style web text."""
    from ezoforge.curate.run import run as run_curate
    from ezoforge.curate.run import summary

    run_curate(recipe, inputs or [], out, force=force, allow_empty=allow_empty)
    console.print(f"{summary(out)} → {out / 'data'}", highlight=False)


@app.command()
@recipe_options(Flag("synth.model", ("--model", "-m"), str,
                     "Model spec, or the served model name with --backend openai (default: the recipe's)."),
                Flag("synth.backend", ("--backend",), str, "auto (llamacpp on a CPU where it runs the model), transformers, llamacpp, vllm or openai."),
                Flag("synth.base_url", ("--base-url",), str, "OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."),
                Flag("synth.api_key_env", ("--api-key-env",), str, "Env var holding the server's API key."),
                Flag("synth.mode", ("--mode",), str,
                     "prompted (any chat model) or synthesizer (Instruction Pre-Training format)."),
                Flag("synth.pairs_per_doc", ("--pairs-per-doc",), int, "Pairs asked for per passage (prompted mode)."),
                Flag("synth.limit", ("--limit",), int, "Draw N documents: a seeded mix of the sources (synth.mix)."),
                Flag("synth.concurrency", ("--concurrency",), int, "Requests in flight (openai backend)."))
def synth(
    recipe: Recipe,
    input: Annotated[Path, typer.Argument(help="A curate output folder, or JSONL/Parquet file(s) with `text` (and `id`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data/, rejected/, stats.json, DONE).")] = ...,
    force: ForceOpt = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="Finish even when no pair is kept.")] = False,
) -> None:
    """Synthesize instruction/response pairs from documents, resumably (completed requests are never resent)."""
    from ezoforge.synth.run import run as run_synth
    from ezoforge.synth.run import summary

    stats = run_synth(recipe, input, out, force=force, allow_empty=allow_empty)
    console.print(f"{summary(out)} → {out / 'data'}", highlight=False)
    if stats["errors"]:
        console.print(f"[yellow]{stats['errors']} request(s) failed[/yellow] — rerun the same command to retry only "
                      "those:", highlight=False)
        for reason, n in stats.get("error_reasons", {}).items():
            console.print(f"  {n}× {escape(reason)}", highlight=False)


@app.command()
@recipe_options(*MODEL_FLAGS[:2],
                Flag("train.qlora", ("--qlora/--no-qlora",), bool,
                     "4-bit NF4 base, or an error if it cannot train here (auto = 4-bit on CUDA, LoRA on a CPU)."),
                Flag("train.max_steps", ("--max-steps",), int, "Optimizer steps."),
                Flag("train.epochs", ("--epochs",), float, "Passes over the data (instead of --max-steps)."),
                Flag("train.save_every", ("--save-every",), int,
                     "Checkpoint every N steps (train.eval_every sets the eval cadence)."),
                Flag("train.seed", ("--seed",), int))
def train(
    recipe: Recipe,
    inputs: Annotated[list[Path], typer.Argument(help="A synth output folder, or JSONL/Parquet with instruction+response (+context) or messages.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (adapter/, checkpoints/, metrics.jsonl, loss.png, DONE).")] = ...,
    force: ForceOpt = False,
) -> None:
    """Instruction-tune a LoRA/QLoRA adapter with assistant-only loss; rerun the same command to resume after a kill."""
    from ezoforge.train.run import run as run_train
    from ezoforge.train.run import summary

    if run_train(recipe, inputs, out, force=force):  # nothing from the other ranks of a distributed run
        console.print(f"{summary(out)} → {out / 'adapter'}", highlight=False)


@app.command()
@recipe_options(Flag("prefer.samples", ("--samples",), int, "Answers sampled per instruction."),
                Flag("prefer.min_margin", ("--min-margin",), float, "Smallest grade gap between chosen and rejected."),
                Flag("prefer.limit", ("--limit",), int, "Instructions drawn from the SFT's pairs."),
                Flag("prefer.max_steps", ("--max-steps",), int, "DPO optimizer steps."),
                JUDGE_URL, JUDGE_MODEL)
def prefer(
    recipe: Recipe,
    train_dir: Annotated[Path, typer.Argument(help="A finished `ezo train` folder: its adapter is the SFT model, its inputs the instructions.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (data/pairs.jsonl, candidates, verdicts, adapter/, DONE).")] = ...,
    force: ForceOpt = False,
) -> None:
    """Preference pairs from the SFT model's own answers, graded by the judge, then DPO continuing the SFT adapter."""
    from ezoforge.prefer.run import run as run_prefer
    from ezoforge.prefer.run import summary

    run_prefer(recipe, train_dir, out, force=force)
    console.print(f"{summary(out)} → {out / 'adapter'}", highlight=False)


@app.command()
@recipe_options(Flag("reinforce.max_steps", ("--max-steps",), int, "GRPO optimizer steps."),
                Flag("reinforce.limit", ("--limit",), int, "Instructions drawn from the SFT's pairs."),
                Flag("reinforce.num_generations", ("--num-generations",), int, "Completions per prompt."),
                JUDGE_URL, JUDGE_MODEL)
def reinforce(
    recipe: Recipe,
    tuned_dir: Annotated[Path, typer.Argument(help="A finished `ezo train` or `ezo prefer` folder: GRPO continues its adapter; the SFT's inputs are the prompts.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (adapter/, metrics.jsonl, rewards.png, DONE).")] = ...,
    force: ForceOpt = False,
) -> None:
    """GRPO continuing the SFT (or DPO) adapter, rewarded by the recipe's named rewards (reinforce.rewards)."""
    from ezoforge.reinforce.run import run as run_reinforce
    from ezoforge.reinforce.run import summary

    run_reinforce(recipe, tuned_dir, out, force=force)
    console.print(f"{summary(out)} → {out / 'adapter'}", highlight=False)


@app.command()
@recipe_options(Flag("merge.dtype", ("--dtype",), str, "bf16 (default), float32, float16, or auto (the base's).",
                     parse=lambda dtype: MERGE_DTYPES.get(dtype, dtype)))
def merge(
    recipe: Recipe,
    train_dir: Annotated[Path, typer.Argument(help="A finished `ezo train` output folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the standalone merged model.")] = ...,
    force: ForceOpt = False,
) -> None:
    """Merge the adapter into a full-precision copy of its base and save a model plain transformers and vLLM load."""
    from ezoforge.train.merge import run as run_merge
    from ezoforge.train.merge import summary

    run_merge(train_dir, out, recipe.merge.dtype, force=force)
    console.print(f"{summary(out)} → {out}", highlight=False)


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


def main() -> None:
    sys.argv[1:] = _force_takes_optional_stage(sys.argv[1:])
    setup_logging(logging.INFO)
    try:
        app()
    except EzoError as e:
        console.print("[bold red]error:[/bold red]", escape(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume")
        sys.exit(130)
    except Exception as e:  # not a user's mistake (those are EzoErrors): the machine's fault, or a bug
        if (fault := machine_fault(e)) is not None:
            console.print("[bold red]error:[/bold red]", escape(str(fault)), highlight=False, soft_wrap=True)
            sys.exit(fault.exit_code)
        import traceback

        from ezoforge.models import cache_root

        log = cache_root() / "logs" / f"ezo-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"ezo {' '.join(sys.argv[1:])}\n{traceback.format_exc()}", encoding="utf-8")
        traceback.print_exc()
        console.print(f"[bold red]internal error[/bold red] — a bug in ezoforge, not in your input; the traceback "
                      f"is above and in {log} (please attach it to an issue)", highlight=False, soft_wrap=True)
        sys.exit(70)


# ---------------------------------------------------------------- export and push

@app.command()
@recipe_options(Flag("export.gguf", ("--gguf",), list[str], "Also write a GGUF (+ Ollama Modelfile): f16 or q8_0 (repeatable)."),
                Flag("export.repo", ("--repo",), str, "USER/NAME the card's usage snippet loads (default: the output folder)."))
def export(
    recipe: Recipe,
    merged: Annotated[Path, typer.Argument(help="A merged model folder (`ezo merge` output).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: `export` beside MERGED).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a folder made with other settings.")] = False,
) -> None:
    """A folder ready to publish: weights, tokenizer, model card (README.md) from the run's records, optional GGUF."""
    from ezoforge.export.run import run as run_export
    from ezoforge.export.run import summary
    from ezoforge.stages import STEPS, eval_folders, how_it_was_made

    out = out or merged.parent / STEPS["export"].folder
    run_export(merged, out, recipe.export, recipe.model.system_prompt, evals=eval_folders(merged.parent),
               made=how_it_was_made(merged), force=force)
    console.print(f"{merged} exported: {summary(out)} → {out}", highlight=False)


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
