"""`ezo`: one subcommand per stage, plus run, validate and plan.

Each command parses its flags, folds them into the recipe (flags < --set overrides), and calls the
stage's `run`. Heavy imports happen inside the commands so `ezo --help` stays instant.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ezoforge.config import Recipe, dump_yaml, load_recipe
from ezoforge.errors import EzoError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ezoforge: turn a base LLM into a Japanese assistant (curate → synth → train → merge → eval).")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML to start from.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Dotted override, e.g. train.max_steps=10 (repeatable).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="HF id, local folder, .gguf file or bundled:smollm2-135m-instruct.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="PEFT adapter folder to apply.")]
TemplateOpt = Annotated[Optional[Path], typer.Option("--chat-template", help="Jinja chat template file, for models without one.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda, cuda:1 …")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (CUDA bf16, CPU float32), float32, bfloat16, float16.")]


def _recipe(config: Path | None, overrides: list[str] | None, **flags: Any) -> Recipe:
    """Flags given on the command line, as a nested dict ("a.b" keys), under --set overrides."""
    extra: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = extra
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_recipe(config, overrides, extra)


def _system(system: str | None, no_system: bool, recipe: Recipe) -> str | None:
    if no_system:
        return None
    return system if system is not None else recipe.model.system_prompt


def _load(recipe: Recipe, adapter: Path | None):
    from ezoforge.models import load

    m = recipe.model
    with console.status(f"loading {m.name}…"):
        loaded = load(m.name, adapter, m.device, m.dtype, m.chat_template)
    console.print(f"[dim]loaded {loaded.name} on {loaded.device} in {loaded.load_seconds:.1f} s[/dim]")
    return loaded


@app.command()
def generate(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="One prompt; the reply is printed.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help='JSONL of {"id", "prompt"} (batch mode).')] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help='JSONL of {"id", "prompt", "answer"} (batch mode).')] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (default: the EZO one).")] = None,
    no_system: Annotated[bool, typer.Option("--no-system", help="Send no system message.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the assistant's reply to --prompt, or answer every line of --input into --out."""
    from ezoforge.infer.generate import Generator, Sampling, build_messages, generate_file

    if (prompt is None) == (input is None):
        raise EzoError("give exactly one of --prompt or --input")
    if input is not None and out is None:
        raise EzoError("--input needs --out")
    if system is not None and no_system:
        raise EzoError("--system and --no-system contradict each other")
    recipe = _recipe(config, set_, **{
        "model.name": model, "model.chat_template": chat_template, "model.device": device, "model.dtype": dtype,
        "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature,
        "generation.top_p": top_p, "generation.seed": seed, "generation.batch_size": batch_size})
    g = recipe.generation
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p, g.seed)
    gen = Generator(_load(recipe, adapter))
    sys_prompt = _system(system, no_system, recipe)
    if prompt is not None:
        print(gen.complete([build_messages(prompt, sys_prompt)], sampling)[0].text)
        return
    n = generate_file(gen, input, out, sys_prompt, sampling, g.batch_size)
    console.print(f"wrote {n} answers to {out}")


@app.command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: Annotated[Optional[str], typer.Option("--system")] = None,
    no_system: Annotated[bool, typer.Option("--no-system")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Interactive multi-turn chat, streamed. Commands: /reset, /system TEXT, /exit."""
    from ezoforge.infer.chat import repl
    from ezoforge.infer.generate import Generator, Sampling

    recipe = _recipe(config, set_, **{
        "model.name": model, "model.chat_template": chat_template, "model.device": device, "model.dtype": dtype,
        "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature})
    g = recipe.generation
    repl(Generator(_load(recipe, adapter)), _system(system, no_system, recipe),
         Sampling(g.max_new_tokens, g.temperature, g.top_p, g.seed))


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    host: Annotated[str, typer.Option("--host", help="Bind address (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Env var holding the bearer key /v1/* requires.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="Model id clients use (default: --model).")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """OpenAI-compatible server: POST /v1/chat/completions (plain and SSE), GET /v1/models, GET /health."""
    from ezoforge.infer.generate import Generator
    from ezoforge.infer.serve import api_key_from_env
    from ezoforge.infer.serve import serve as run_server

    recipe = _recipe(config, set_, **{"model.name": model, "model.chat_template": chat_template,
                                      "model.device": device, "model.dtype": dtype})
    api_key_from_env(api_key_env)  # fail before the slow model load
    gen = Generator(_load(recipe, adapter))
    run_server(gen, served_model_name or recipe.model.name, host, port, api_key_env)


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None) -> None:
    """Load a recipe and print it resolved, or fail naming the bad key."""
    print(dump_yaml(load_recipe(recipe, set_)), end="")


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Rerun every stage even if done.")] = False) -> None:
    """Run the recipe's stages in order into its workdir, skipping stages already done with the same config."""
    from ezoforge.pipeline import run_recipe

    run_recipe(load_recipe(recipe, set_), recipe, force=force)


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")], set_: SetOpt = None,
         gpu: Annotated[str, typer.Option("--gpu", help="Card to estimate for: h100, h200, a100-80gb, a100-40gb, l40s, l4, rtx4090.")] = "h100",
         as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False) -> None:
    """Estimate a run before starting it: tokens per stage, training GPU memory, hours on the card."""
    import json

    from ezoforge.plan import CARDS, plan as make_plan, print_plan

    if gpu not in CARDS:
        raise EzoError(f"--gpu {gpu}: unknown card (known: {', '.join(CARDS)})")
    result = make_plan(load_recipe(recipe, set_), gpu)
    print(json.dumps(result, indent=2)) if as_json else print_plan(result)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_rich_handler()])
    for noisy in ("httpx", "urllib3", "datatrove"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except EzoError as e:
        console.print("[bold red]error:[/bold red]", escape(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


def _rich_handler() -> logging.Handler:
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, show_time=False)
