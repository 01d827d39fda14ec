"""Every shipped recipe rehearsed end to end on this CPU, as `ezo run RECIPE --smoke` runs it, with only what a CPU
without the hub cannot have replaced (each replacement is printed with its reason):

- the base: a tiny random model of the same architecture, saved sharded in bfloat16 as hub checkpoints are;
- the inputs: the package's own Wikipedia dump and FineWeb Parquet where the recipe's are not on disk;
- synthesis: a scripted OpenAI-compatible synthesizer (a random model writes no pair the parser keeps, and vLLM
  needs CUDA), in the recipe's own mode;
- the judge: the scripted judge (tests/scripted_judge.py), with the recipe's judge model, key variable and protocol;
- tasks that load from the hub: the package's ELYZA-format tasks, JCommonsenseQA from ../shared/data;
- a few documents, steps and tasks: `--smoke`'s cuts, fewer documents and tasks still, and one batch per
  optimizer step;
- curate's workers: at most this machine's cores (an operational setting).

Everything else runs as written: `qlora: true` through bitsandbytes on the CPU, `model.quantize: nf4`, a sharded
bfloat16 merge, `samples` x `judgments` judging, the recipe's lengths and batch shapes. The 70B recipe's rehearsal
runs in `make test`; the others are `slow` (`make test-all`).
"""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from ezoforge.config import bundled_data
from ezoforge.export.provenance import gather
from ezoforge.models import model_identity
from ezoforge.smoke import run_smoke, smoke_recipe
from ezoforge.stages import load_recipe
from scripted_judge import ScriptedJudge, judge_and_synthesizer
from families import make_tiny
from trainkit import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")
                 if "workdir" in (yaml.safe_load(p.read_text(encoding="utf-8")) or {}))
# demo.yaml runs (cut to seconds) as the session's demo_run, which the pipeline tests share.
REHEARSED = [name for name in RECIPES if name != "demo.yaml"]
IN_MAKE_TEST = {"llama31-70b-ezo.yaml"}
# The architecture family of a recipe's base, by what its name says; a new family needs its tiny model here.
FAMILIES = {"llama": "llama", "smollm2": "llama", "qwen3": "qwen3"}
JCQA = ROOT.parent / "shared" / "data" / "jglue" / "jcommonsenseqa" / "valid-v1.3.json"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random tiny model of a family (Llama: with the bundled tokenizer), saved in bfloat16 as several shards (as
    hub bases are); one per family, made when a recipe first asks."""
    made = {}

    def of(family: str) -> str:
        if family not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}-bf16")
            if family == "llama":
                make_tiny_llama(out, context=8192, dtype=torch.bfloat16, shard="3MB")
            else:
                make_tiny(family, out, dtype=torch.bfloat16, context=8192, shard="300KB")
            assert len(list(out.glob("*.safetensors"))) > 1
            made[family] = str(out)
        return made[family]
    return of


def family(name: str) -> str | None:
    return next((f for key, f in FAMILIES.items() if key in name.lower()), None)


def rehearsal(path: Path, tiny: str, server: str, workdir: Path) -> tuple[list[str], list[str]]:
    """The --set overrides that rehearse the recipe here, and one line per replacement saying why."""
    recipe = load_recipe(path)
    sets, why = [f"workdir={workdir}", f"model.name={tiny}"], []
    why.append(f"model.name: {recipe.model.name} -> a tiny random {family(recipe.model.name)} model (no weights here)")
    if any(not Path(p).exists() and not p.startswith("bundled:") for p in recipe.curate.inputs):
        wiki, web = (bundled_data(f"bundled:{p}") for p in ("wiki/jawiki-demo-pages-articles.xml",
                                                              "web/fineweb-demo.parquet"))
        sets.append(f"curate.inputs=[{wiki}, {web}]")
        why.append("curate.inputs: the package's Wikipedia dump and FineWeb Parquet (the recipe's are not on disk)")
    cores = os.cpu_count() or 1
    if recipe.curate.workers > cores:  # operational: the same documents, fewer processes at once
        sets.append(f"curate.workers={cores}")
        why.append(f"curate.workers: {recipe.curate.workers} -> {cores} (this machine's cores)")
    sets += ["synth.backend=openai", f"synth.base_url={server}", f"synth.model={tiny}"]
    why.append(f"synth.backend: {recipe.synth.backend} -> the scripted synthesizer in {recipe.synth.mode} mode "
               "(vLLM needs CUDA; a random model writes no pair the parser keeps)")
    sets += [f"eval.judge_url={server}"] + (["eval.judge_model=scripted"] if recipe.eval.judge_url == "local" else [])
    why.append(f"eval.judge_url: {recipe.eval.judge_url} -> the scripted judge (same protocol: "
               f"{recipe.eval.samples} x {recipe.eval.judgments})")
    tasks = []
    for task in recipe.eval.tasks:
        if task == "elyza100":
            tasks.append("elyza100:bundled:tasks/demo-tasks.jsonl")
        elif task == "jcqa" and JCQA.exists():
            tasks.append(f"jcqa:{JCQA}")
        elif ":" in task:
            tasks.append(task)
        else:
            why.append(f"eval.tasks: {task} dropped (it loads from the hub)")
            continue
        if tasks[-1] != task:
            why.append(f"eval.tasks: {task} -> {tasks[-1]} (the hub's copy is out of reach)")
    sets.append(f"eval.tasks=[{', '.join(tasks)}]")
    # Fewer than --smoke's cuts (the cuts are maxima): enough to fill a training row and judge a task 3 x 3.
    sets += ["curate.limit=16", "synth.limit=2", "eval.limit=1", "eval.generation.max_new_tokens=64"]
    why.append("curate.limit 16, synth.limit 2, eval.limit 1, eval answers of at most 64 tokens: a few documents and "
               "short tasks")
    if recipe.train.grad_accum > 1:  # each step's rows keep their shape: only fewer of them are summed
        sets.append("train.grad_accum=1")
        why.append(f"train.grad_accum: {recipe.train.grad_accum} -> 1 (a few steps: each still max_length rows of "
                   f"batch_size {recipe.train.batch_size})")
    if recipe.eval.backend == "vllm":
        sets.append("eval.backend=transformers")
        why.append("eval.backend: vllm -> transformers (vLLM needs CUDA)")
    return sets, why


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in IN_MAKE_TEST else pytest.mark.slow)
                                  for n in REHEARSED])
def test_shipped_recipe_rehearses_on_the_cpu(name, tiny_base, tmp_path, monkeypatch):
    path = ROOT / "recipes" / name
    written = load_recipe(path)
    if family(written.model.name) is None:
        pytest.fail(f"{name}: cannot rehearse: no tiny model of {written.model.name}'s architecture (add its family)")
    tiny = tiny_base(family(written.model.name))
    if written.eval.judge_api_key_env:  # the stage processes read the key from the recipe's variable
        monkeypatch.setenv(written.eval.judge_api_key_env, "sk-rehearsal")
    with ScriptedJudge(judge_and_synthesizer) as server:
        sets, why = rehearsal(path, tiny, server.url, tmp_path / "run")
        print(f"{name} rehearsed with:", *why, sep="\n  ")
        recipe = load_recipe(path, sets)
        result = run_smoke(recipe, path, ram_gib=64)
    work = Path(smoke_recipe(recipe).workdir)
    assert set(result["stages"]) == set(json.loads((work / "report.json").read_text())["stages"])
    assert all(r["peak_ram_gib"] and r["peak_ram_gib"] > 0 for r in result["stages"].values())

    train = json.loads((work / "train" / "stats.json").read_text())
    assert train["qlora"] == (written.train.qlora is True)  # bitsandbytes 4-bit on the CPU, as the recipe says
    assert train["steps"] == smoke_recipe(recipe).train.max_steps
    if "merge" in recipe.stages:
        merged = json.loads((work / "merged" / "config.json").read_text())
        assert merged["dtype" if "dtype" in merged else "torch_dtype"] == written.merge.dtype.replace("auto", "bfloat16")
    tuned = json.loads((work / "eval-tuned" / "report.json").read_text())
    if written.model.quantize == "nf4":  # the quantized base + the adapter, as trained (eval.run.scores_adapter)
        adapter = work / "train" / "adapter"
        assert (tuned["model"]["quantize"], Path(tuned["model"]["adapter"])) == ("nf4", adapter)
        assert tuned["model"]["fingerprint"] == model_identity(tiny, adapter, device="cpu", quantize="nf4") \
            != model_identity(str(work / "merged"), device="cpu", quantize="nf4")
        # the card's provenance counts it as the merged model's eval
        assert gather(work / "merged", {"tuned": work / "eval-tuned"}).evals["tuned"]["model"]["quantize"] == "nf4"
    judged = [json.loads(line) for line in (work / "eval-tuned" / "judgements.jsonl").read_text().splitlines()]
    answered = len({j["task_id"] for j in judged})
    assert len(judged) == answered * written.eval.samples * written.eval.judgments


def test_smoke_names_a_stage_over_the_plan(tmp_path):
    from ezoforge.plan import plan
    from ezoforge.smoke import compare

    recipe = load_recipe(ROOT / "recipes" / "llama31-70b-ezo.yaml")
    planned = plan(recipe, "h100")["stages"]
    (tmp_path / "timings.json").write_text(json.dumps({
        "train": {"seconds": 9.0, "peak_gpu_gib": planned["train"]["gpu_gib"] + 1, "peak_ram_gib": 1.0},
        "merge": {"seconds": 3.0, "peak_gpu_gib": 0.0, "peak_ram_gib": planned["merge"]["ram_gib"]}}))
    result = compare(recipe, tmp_path, 64, "h100")
    assert result["stages"]["train"]["within_plan"] is False and result["stages"]["merge"]["within_plan"] is True
    assert result["within_plan"] is False
    assert result["stages"]["train"]["plan_tokens_per_s"] == 850  # the measured 70B reference step on an H100
    assert result["stages"]["synth"]["plan_tokens_per_s"] > 0
    assert compare(recipe, tmp_path, 64, None)["within_plan"] is None  # no card: shown, not judged


def test_smoke_cuts_are_maxima_and_keep_auto_settings_unstated():
    path = ROOT / "recipes" / "llama31-70b-ezo.yaml"
    cut = smoke_recipe(load_recipe(path))
    assert (cut.synth.limit, cut.train.max_steps, cut.train.epochs, cut.eval.limit) == (4, 2, None, 2)
    assert str(cut.workdir).endswith("-smoke") and "backend" not in cut.eval.model_fields_set  # eval.backend: auto
    assert smoke_recipe(load_recipe(path, ["synth.limit=2", "eval.limit=1"])).synth.limit == 2
