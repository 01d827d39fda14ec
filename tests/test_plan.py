"""`ezo plan`: every stage's memory, disk and hours on a card, whether it fits, what would make it fit; measured
figures where they exist (with their source named); the synth data mix; recipe comments equal to its output."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ezoforge.cli import app
from ezoforge.config import load_recipe
from ezoforge.plan import MEASURED, RUN_RAM_GIB, plan, summary_lines

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = RECIPES / "demo.yaml"
EZO_70B = RECIPES / "llama31-70b-ezo.yaml"
EZO_70B_L40S = RECIPES / "llama31-70b-ezo-l40s.yaml"
GPU_RECIPES = sorted(RECIPES.glob("llama31-*.yaml"))
STAGE_KEYS = {"gpu_gib", "ram_gib", "disk_gib", "hours", "fits"}


def test_plan_json_has_every_stage_and_fits_only_when_all_do():
    result = CliRunner().invoke(app, ["plan", str(EZO_70B), "--gpu", "h100", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert list(out["stages"]) == ["curate", "synth", "train", "merge", "eval-base", "eval-tuned"]
    for stage in out["stages"].values():
        assert STAGE_KEYS <= set(stage) and isinstance(stage["fits"], bool)
    assert {"tokens", "synth_mix", "train_memory_gib", "hours", "sources", "assumptions"} <= set(out)
    # On a 24 GB card some stages fit (the host-side merge) and some do not: the run does not.
    for card in ("h100", "l40s", "l4"):
        stages = plan(load_recipe(EZO_70B), card)
        assert stages["fits"] == all(s["fits"] for s in stages["stages"].values())
    on_l4 = plan(load_recipe(EZO_70B), "l4")
    assert on_l4["stages"]["merge"]["fits"] and not on_l4["stages"]["train"]["fits"] and not on_l4["fits"]


@pytest.mark.parametrize(("path", "card"), [(EZO_70B, "h100"), (EZO_70B_L40S, "l40s")])
def test_the_ezo_recipes_fit_every_stage_on_their_card(path, card):
    out = plan(load_recipe(path), card)
    assert out["fits"], {name: s.get("to_fit") for name, s in out["stages"].items()}
    assert all(s["gpu_gib"] <= out["card_gib"] for s in out["stages"].values())
    # As the seed made it: the 7B synthesizer in its own format on vLLM; answers in NF4; merge on the host.
    recipe = load_recipe(path)
    assert (recipe.synth.model, recipe.synth.mode, recipe.synth.backend) == (
        "instruction-pretrain/instruction-synthesizer", "synthesizer", "vllm")
    assert out["assumptions"]["eval_quantize"] == "nf4"
    assert out["stages"]["merge"]["gpu_gib"] == 0 and out["stages"]["merge"]["ram_gib"] < 16


def test_a_stage_that_does_not_fit_names_the_setting_that_makes_it_fit():
    # The 70B's answers in bf16 (141 GB) on a 48 GB card.
    recipe = load_recipe(EZO_70B_L40S, ["model.quantize=none"])
    out = plan(recipe, "l40s")
    assert not out["fits"]
    evals = out["stages"]["eval-base"]
    assert not evals["fits"] and evals["gpu_gib"] > 48 and evals["to_fit"] == "model.quantize: nf4"
    assert all(s["fits"] for n, s in out["stages"].items() if not n.startswith("eval"))
    # The 70B itself as the synthesizer, bf16 with its full 128k context, on an H100: FP8 and a 4k context fit.
    prompted = load_recipe(EZO_70B, ["synth.model=null", "synth.mode=prompted", "synth.context_tokens=null"])
    synth = plan(prompted, "h100")["stages"]["synth"]
    assert not synth["fits"] and synth["to_fit"] == "synth.vllm.quantization: fp8, synth.context_tokens: 4096"
    fixed = load_recipe(EZO_70B, ["synth.model=null", "synth.mode=prompted", "synth.vllm.quantization=fp8",
                                  "synth.context_tokens=4096"])
    assert plan(fixed, "h100")["stages"]["synth"]["fits"]
    # Answers from a vLLM engine holding the 70B in bf16: the same engine settings, under eval.
    engine = plan(load_recipe(EZO_70B, ["eval.backend=vllm"]), "h100")["stages"]["eval-base"]
    assert not engine["fits"] and engine["to_fit"] == "eval.vllm.quantization: fp8, eval.context_tokens: 4096"
    # A host too small for even the streaming merge: no recipe setting helps, and it says what RAM it needs.
    merge = plan(load_recipe(EZO_70B), "h100", ram_gib=8)["stages"]["merge"]
    needs = merge["ram_gib"] + RUN_RAM_GIB  # the stage's own and `ezo run`'s beside it
    assert not merge["fits"] and merge["to_fit"].startswith(f"no recipe setting: needs {needs:.1f} GiB")


def test_training_batch_advice_keeps_the_global_batch():
    out = plan(load_recipe(EZO_70B_L40S, ["train.batch_size=4", "train.grad_accum=8"]), "l40s")
    train = out["stages"]["train"]
    assert not train["fits"] and train["to_fit"] == "train.batch_size: 1, train.grad_accum: 32"


PLAN_HEAD = re.compile(r"^# (ezo plan --gpu (\S+):)$")
FIGURE = re.compile(r"(?<![\w-])\d[\d,.]*\s*(GiB|GB|TB|MB|hours?|h)\b")  # not a card name (A100-80GB)


def stated(path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The `# ezo plan --gpu CARD:` blocks of a recipe's comments (heading + indented lines), and any comment
    line outside them that states a memory or time figure."""
    blocks: dict[str, list[str]] = {}
    loose: list[str] = []
    card = None
    for line in path.read_text(encoding="utf-8").splitlines():
        comment = line.strip() if line.lstrip().startswith("#") else line.partition(" # ")[2]
        if head := PLAN_HEAD.match(comment):
            card = head.group(2)
            blocks[card] = [head.group(1)]
        elif card and comment.startswith("#   "):
            blocks[card].append(comment[2:])
        else:
            card = None
            if FIGURE.search(comment):
                loose.append(comment)
    return blocks, loose


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_recipe_comments_state_only_figures_that_plan_prints(path):
    blocks, loose = stated(path)
    assert blocks, f"{path.name}: no `# ezo plan --gpu CARD:` block"
    assert not loose, f"{path.name}: figures outside an `ezo plan` block: {loose}"
    recipe = load_recipe(path)
    for card, lines in blocks.items():
        assert lines == summary_lines(plan(recipe, card)), f"{path.name}: the {card} block differs from `ezo plan`"


def test_the_comment_parser_sees_a_wrong_figure(tmp_path):
    text = EZO_70B.read_text(encoding="utf-8")
    wrong = tmp_path / "r.yaml"
    wrong.write_text(text.replace(" h ·", "1 h ·", 1), encoding="utf-8")
    blocks, _ = stated(wrong)
    assert blocks["h100"] != summary_lines(plan(load_recipe(EZO_70B), "h100"))
    wrong.write_text("# QLoRA peaks near 10 GiB\n" + text, encoding="utf-8")
    assert stated(wrong)[1] == ["# QLoRA peaks near 10 GiB"]


def test_plan_uses_measured_figures_at_their_shape_and_names_every_source():
    recipe = load_recipe(EZO_70B, [])
    measured = MEASURED[("llama-3.1-70b", "h100")]
    on_h100 = plan(recipe, "h100")
    assert on_h100["train_memory_gib"] == on_h100["stages"]["train"]["gpu_gib"] == measured.peak_gib
    assert on_h100["assumptions"]["train_tokens_per_s"] == round(measured.tokens_per_s)
    assert on_h100["sources"]["train_memory_gib"].startswith("measured: 1 x 4096 tokens, HF+peft QLoRA reference")
    # Another card, or another shape on the same card: the calibrated model, and the plan says so.
    for other in (plan(recipe, "l40s"), plan(load_recipe(EZO_70B, ["train.max_length=2048"]), "h100")):
        assert other["train_memory_gib"] != measured.peak_gib
        # (the RAM `ezo run` keeps beside each stage is measured on the host, whatever the card)
        assert all(src.startswith("model:") for k, src in other["sources"].items() if k != "run_ram_gib")
        assert other["sources"]["run_ram_gib"].startswith("measured:")


def test_plan_shows_the_synth_mix(bundled):
    set_ = plan(load_recipe(DEMO))["synth_mix"]
    assert set_ == {"basis": "synth.mix", "sources": {"fineweb": {"share": 0.5, "documents": 4},
                                                      "wikipedia": {"share": 0.5, "documents": 4}}}
    estimated = plan(load_recipe(DEMO, ["synth.mix=null"]))["synth_mix"]
    assert estimated["basis"] == "input sizes (estimate)" and set(estimated["sources"]) == {"wikipedia", "fineweb"}
    assert sum(v["share"] for v in estimated["sources"].values()) == pytest.approx(1, abs=0.002)
    assert all(v["documents"] >= 1 for v in estimated["sources"].values())


def test_the_llamacpp_backend_plans_cpu_ram_and_the_run_beside_each_stage(bundled):
    """llama.cpp holds the model and its KV cache in RAM, no GPU; `ezo run` and its fork server count beside every
    stage, so a stage that fits RAM alone but not with them does not fit."""
    cpu = load_recipe(DEMO, ["synth.backend=llamacpp", "synth.llamacpp.kv_tokens=4096", "eval.backend=llamacpp"])
    more_kv = load_recipe(DEMO, ["synth.backend=llamacpp", "synth.llamacpp.kv_tokens=65536"])
    out, bigger = plan(cpu, "h100"), plan(more_kv, "h100")
    synth = out["stages"]["synth"]
    assert synth["gpu_gib"] == 0.0 and "llama.cpp on the CPU" in out["sources"]["synth"]
    assert bigger["stages"]["synth"]["ram_gib"] > synth["ram_gib"]  # the KV cache is counted
    assert "llama.cpp" in out["sources"]["eval"]
    # the merged model and the bundled base (a Q4_1 file) are each written once as an f16 GGUF for llama.cpp
    assert out["stages"]["eval-tuned"]["disk_gib"] >= out["stages"]["eval-base"]["disk_gib"] > 0.1
    assert plan(load_recipe(DEMO))["stages"]["eval-base"]["disk_gib"] == 0.0  # transformers writes no GGUF
    ram = synth["ram_gib"]
    assert plan(cpu, "h100", ram_gib=ram + RUN_RAM_GIB + 0.2)["stages"]["synth"]["fits"]
    tight = plan(cpu, "h100", ram_gib=ram + RUN_RAM_GIB / 2)["stages"]["synth"]
    assert not tight["fits"] and "GiB of RAM" in tight["to_fit"]
