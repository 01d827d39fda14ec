"""`ezo plan`: every stage's memory, disk and hours on a card, whether it fits, what would make it fit; measured
figures where they exist (with their source named); the synth data mix; recipe comments equal to its output."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ezoforge.cli import app
from ezoforge.plan import CARDS, GIB, RUN_RAM_GIB, plan, summary_lines
from ezoforge.stages import load_recipe
from ezoforge.train.estimate import MEASURED, MERGE_PARAMS_PER_S, TOKENIZED_BYTES_PER_TOKEN

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = RECIPES / "demo.yaml"
EZO_70B = RECIPES / "llama31-70b-ezo.yaml"
EZO_70B_L40S = RECIPES / "llama31-70b-ezo-l40s.yaml"
GPU_RECIPES = sorted([*RECIPES.glob("llama31-*.yaml"), *RECIPES.glob("qwen3-*.yaml")])
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
    # The 70B itself as the synthesizer, bf16 with its full 128k context, on an H100: FP8 and a 4k context fit,
    # once vLLM may take 0.95 of the card (at 0.9 the weights leave too little for one context's KV cache).
    prompted = load_recipe(EZO_70B, ["synth.model=null", "synth.mode=prompted", "synth.context_tokens=null"])
    synth = plan(prompted, "h100")["stages"]["synth"]
    fp8 = "synth.vllm.quantization: fp8, synth.context_tokens: 4096, synth.vllm.gpu_memory_utilization: 0.95"
    assert not synth["fits"] and synth["to_fit"] == fp8
    fixed = ["synth.model=null", "synth.mode=prompted", "synth.vllm.quantization=fp8", "synth.context_tokens=4096"]
    assert not plan(load_recipe(EZO_70B, fixed), "h100")["stages"]["synth"]["fits"]
    room = load_recipe(EZO_70B, [*fixed, "synth.vllm.gpu_memory_utilization=0.95"])
    assert plan(room, "h100")["stages"]["synth"]["fits"]
    # Answers from a vLLM engine holding the 70B in bf16: the same engine settings, under eval.
    engine = plan(load_recipe(EZO_70B, ["eval.backend=vllm"]), "h100")["stages"]["eval-base"]
    assert not engine["fits"] and engine["to_fit"] == fp8.replace("synth.", "eval.")
    # A host too small for even the streaming merge: no recipe setting helps, and it says what RAM it needs.
    merge = plan(load_recipe(EZO_70B), "h100", ram_gib=8)["stages"]["merge"]
    needs = merge["ram_gib"] + RUN_RAM_GIB  # the stage's own and `ezo run`'s beside it
    assert not merge["fits"] and merge["to_fit"].startswith(f"no recipe setting: needs {needs:.1f} GiB")


def test_cards_hold_what_nvidia_smi_reports_not_their_nominal_gb():
    assert plan(load_recipe(EZO_70B), "h100")["card_gib"] == 79.6  # an "80GB" H100: 81,559 MiB
    assert round(CARDS["l40s"].memory_gib, 1) == 45.0 and round(CARDS["a100-80gb"].memory_gib, 1) == 80.0
    # vLLM takes its share of what the card holds: 0.9 of 79.6 GiB, not of 80
    assert plan(load_recipe(EZO_70B), "h100")["stages"]["synth"]["gpu_gib"] == 71.7


def test_train_hours_count_the_trainers_held_out_evaluations():
    often, rarely = (plan(load_recipe(EZO_70B, [f"train.eval_every={n}"])) for n in (10, 1000))
    assert often["tokens"]["train"] == rarely["tokens"]["train"]
    assert often["stages"]["train"]["hours"] > rarely["stages"]["train"]["hours"]
    # 232 steps: evaluated before step 1, every 50 steps and after the last (6 times); every 1000: before and after
    default = plan(load_recipe(EZO_70B))
    assert default["tokens"]["train_held_out"] == pytest.approx(3 * rarely["tokens"]["train_held_out"], rel=1e-6)
    assert "6 held-out evaluations" in default["sources"]["train_hours"]
    none = plan(load_recipe(EZO_70B, ["train.eval_fraction=0"]))
    assert none["tokens"]["train_held_out"] == 0 and "0 held-out evaluations" in none["sources"]["train_hours"]


def test_grouping_pairs_by_passage_trains_fewer_tokens_than_one_pair_each():
    grouped, alone = (plan(load_recipe(EZO_70B, [f"train.group_pairs={g}"])) for g in ("passage", "none"))
    assert grouped["tokens"]["train"] < alone["tokens"]["train"] / 3  # the passage once instead of five times
    assert grouped["train_by_group_pairs"] == alone["train_by_group_pairs"]  # each plan shows both settings
    assert grouped["train_by_group_pairs"]["none"]["hours"] == alone["stages"]["train"]["hours"]
    assert "train.group_pairs none: " in grouped["notes"]["train_group_pairs"]
    # The seed's 70B at the measured 850 tokens/s on one H100: within 10 hours only grouped.
    assert grouped["stages"]["train"]["hours"] <= 10 < alone["stages"]["train"]["hours"]
    # A group longer than max_length splits into conversations that each carry the passage again.
    split = plan(load_recipe(EZO_70B, ["train.max_length=1800"]))
    split_alone = plan(load_recipe(EZO_70B, ["train.max_length=1800", "train.group_pairs=none"]))
    assert grouped["tokens"]["train"] < split["tokens"]["train"] < split_alone["tokens"]["train"]


def test_merge_hours_follow_the_measured_rate():
    for path in (EZO_70B, RECIPES / "llama31-8b.yaml"):
        out = plan(load_recipe(path))
        assert out["stages"]["merge"]["hours"] == round(out["params_b"] * 1e9 / MERGE_PARAMS_PER_S / 3600, 2)
        assert "bench/merge_bench.py" in out["sources"]["merge_hours"]
    assert plan(load_recipe(EZO_70B))["stages"]["merge"]["hours"] > 0.5  # 70.6 B params at 32 M/s


def test_train_ram_counts_the_tokenized_rows():
    small, large = (plan(load_recipe(EZO_70B, [f"synth.limit={n}"])) for n in (8000, 16000))
    grown = large["tokens"]["train_data"] - small["tokens"]["train_data"]
    assert grown > 0
    assert large["stages"]["train"]["ram_gib"] - small["stages"]["train"]["ram_gib"] == pytest.approx(
        grown * TOKENIZED_BYTES_PER_TOKEN / GIB, abs=0.11)  # figures rounded to 0.1 GiB


def test_training_batch_advice_keeps_the_global_batch():
    out = plan(load_recipe(EZO_70B_L40S, ["train.batch_size=4", "train.grad_accum=8"]), "l40s")
    train = out["stages"]["train"]
    assert not train["fits"] and train["to_fit"] == "train.batch_size: 1, train.grad_accum: 32"


PLAN_HEAD = re.compile(r"^# (ezo plan --gpu (\S+):)$")
SETS = re.compile(r"^#\s+(--set \S+\s*)+$")  # `#   --set KEY=VALUE …` lines: the settings of the next block
FIGURE = re.compile(r"(?<![\w-])\d[\d,.]*\s*(GiB|GB|TB|MB|hours?|h)\b")  # not a card name (A100-80GB)


def stated(path: Path) -> tuple[dict[tuple[str, tuple[str, ...]], list[str]], list[str]]:
    """The `# ezo plan --gpu CARD:` blocks of a recipe's comments (heading + indented lines), by card and the
    overrides of the `#   --set KEY=VALUE …` lines right above the heading, and any comment line outside them
    that states a memory or time figure."""
    blocks: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    loose: list[str] = []
    key, sets = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        comment = line.strip() if line.lstrip().startswith("#") else line.partition(" # ")[2]
        if head := PLAN_HEAD.match(comment):
            key, sets = (head.group(2), tuple(sets)), []
            blocks[key] = [head.group(1)]
        elif key and comment.startswith("#   "):
            blocks[key].append(comment[2:])
        else:
            key = None
            sets = sets + re.findall(r"--set (\S+)", comment) if SETS.match(comment) else []
            if FIGURE.search(comment):
                loose.append(comment)
    return blocks, loose


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_recipe_comments_state_only_figures_that_plan_prints(path):
    blocks, loose = stated(path)
    assert blocks, f"{path.name}: no `# ezo plan --gpu CARD:` block"
    assert not loose, f"{path.name}: figures outside an `ezo plan` block: {loose}"
    for (card, sets), lines in blocks.items():
        assert lines == summary_lines(plan(load_recipe(path, list(sets)), card)), \
            f"{path.name}: the {card} block {' '.join(sets)} differs from `ezo plan`"


def test_the_comment_parser_sees_a_wrong_figure(tmp_path):
    text = EZO_70B.read_text(encoding="utf-8")
    wrong = tmp_path / "r.yaml"
    wrong.write_text(text.replace(" h ·", "1 h ·", 1), encoding="utf-8")
    blocks, _ = stated(wrong)
    assert blocks["h100", ()] != summary_lines(plan(load_recipe(EZO_70B), "h100"))
    # the FP8 synth alternative's block is planned with the settings listed above it
    fp8 = next(sets for card, sets in blocks if sets)
    assert "synth.vllm.quantization=fp8" in fp8 and len(fp8) == 6
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
        # (the RAM `ezo run` keeps beside each stage and the merge's rate are measured on the host, whatever the card)
        host = ("run_ram_gib", "merge_hours")
        assert all(src.startswith("model:") for k, src in other["sources"].items() if k not in host)
        assert all(other["sources"][k].startswith("measured:") for k in host)


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


def test_several_cards_shard_training_and_run_a_synth_engine_per_card():
    """`--num-gpus 8`: FSDP holds an eighth of the weights and optimizer state per card (plus a gathered layer), at
    eight cards' throughput less FSDP's share; synth runs an engine per card, each with its own host memory."""
    from conftest import ezo_in_process

    one, eight = plan(load_recipe(EZO_70B), "h100"), plan(load_recipe(EZO_70B), "h100", ram_gib=1024, num_gpus=8)
    t1, t8 = one["stages"]["train"], eight["stages"]["train"]
    assert t8["gpu_gib"] < t1["gpu_gib"] / 3 and t8["hours"] < t1["hours"] / 4 and t8["fits"]
    assert "FSDP over 8 cards" in eight["sources"]["train_memory_gib"]
    assert eight["sources"]["train_tokens_per_s"].startswith("model:")  # the 1-card measurement is not reused
    s1, s8 = one["stages"]["synth"], eight["stages"]["synth"]
    assert s8["gpu_gib"] == s1["gpu_gib"] and s8["hours"] < s1["hours"] / 6
    assert s8["ram_gib"] == pytest.approx(8 * s1["ram_gib"], abs=0.5)  # figures rounded to 0.1 GiB
    assert summary_lines(eight)[0] == "ezo plan --gpu h100 --num-gpus 8:"
    shown = ezo_in_process("plan", EZO_70B, "--gpu", "h100", "--num-gpus", "8", "--ram", "1024")
    assert shown.returncode == 0 and "8 x h100" in shown.stdout and "every stage fits on 8 x h100" in shown.stdout


def test_reinforce_plans_the_trainer_the_generation_engine_and_the_judge_together():
    stages = ["stages=[curate,synth,train,reinforce,merge,eval]", "eval.judge_url=local",
              "eval.judge_model=meta-llama/Llama-3.1-8B-Instruct", "reinforce.engine=transformers"]
    judged = plan(load_recipe(RECIPES / "llama31-8b.yaml", [*stages, "reinforce.rewards={judge: 1.0}"]), "h100")
    alone = plan(load_recipe(RECIPES / "llama31-8b.yaml", [*stages, "reinforce.rewards={japanese: 1.0}",
                                                           "reinforce.rewards.judge=0"]), "h100")
    parts = judged["stages"]["reinforce"]["gpu_parts_gib"]
    assert parts["judge"] > 15 and alone["stages"]["reinforce"]["gpu_parts_gib"]["judge"] == 0  # an 8B in bf16
    assert judged["stages"]["reinforce"]["gpu_gib"] == pytest.approx(sum(parts.values()), abs=0.05)
    assert judged["stages"]["reinforce"]["fits"] and judged["stages"]["reinforce"]["judge_calls"] > 0
    # vLLM colocated holds its share of the card whatever the batch.
    vllm = plan(load_recipe(RECIPES / "llama31-8b.yaml", [*stages, "reinforce.engine=vllm"]), "h100")
    assert vllm["stages"]["reinforce"]["gpu_parts_gib"]["generation"] == pytest.approx(0.3 * CARDS["h100"].memory_gib,
                                                                                        abs=0.01)
    # A share too small for vLLM's own 16-bit copy of the 8B (16 GB) does not fit, however much card is left.
    small = plan(load_recipe(RECIPES / "llama31-8b.yaml", [*stages, "reinforce.engine=vllm",
                                                           "reinforce.vllm_gpu_memory_utilization=0.2"]), "h100")
    assert not small["stages"]["reinforce"]["fits"] and small["stages"]["reinforce"]["gpu_gib"] < 79.6
    assert small["stages"]["reinforce"]["to_fit"] == "reinforce.vllm_gpu_memory_utilization: 0.4"
    # 8 prompts x 16 completions of 1,024 tokens beside the judge do not fit: the plan names what does.
    big = ["reinforce.batch_size=8", "reinforce.num_generations=16", "reinforce.max_completion_length=1024"]
    crowded = plan(load_recipe(RECIPES / "llama31-8b.yaml", [*stages, *big]), "h100")["stages"]["reinforce"]
    assert not crowded["fits"] and crowded["to_fit"] == "reinforce.batch_size: 1"
    assert plan(load_recipe(RECIPES / "llama31-8b.yaml", [*stages, *big, "reinforce.batch_size=1"]),
                "h100")["stages"]["reinforce"]["fits"]


def test_a_new_eval_task_type_is_planned_by_what_it_declares(monkeypatch):
    """A new eval task type is its module and one registry line; `ezo plan` reads what the type declares (a
    likelihood score loads the model where eval runs, a question's turns are each answered), never its name."""
    from ezoforge.eval.task_types.elyza100 import Elyza100
    from ezoforge.eval.task_types.ppl import Ppl
    from ezoforge.eval.tasks import TASK_TYPES

    class Surprisal(Ppl):  # its module: a likelihood task, scored as perplexity is
        kind = "surprisal"

    class FollowUp(Elyza100):  # its module: a judged task that asks a second turn
        kind = "follow-up"
        turns = 2

    for new in (Surprisal(), FollowUp()):
        monkeypatch.setitem(TASK_TYPES, new.kind, new)  # its line in eval/tasks.py
    served = ["eval.backend=openai", "eval.base_url=http://127.0.0.1:9/v1", "eval.judge_url=http://127.0.0.1:9/v1",
              "eval.limit=10"]

    def planned(*tasks):
        return plan(load_recipe(RECIPES / "llama31-8b.yaml", [*served, f"eval.tasks=[{', '.join(tasks)}]"]), "h100")

    judged = planned("elyza100:t.jsonl")
    assert judged["stages"]["eval-base"]["gpu_gib"] == 0  # a served model answers: nothing loads here
    assert planned("elyza100:t.jsonl", "surprisal:p.jsonl")["stages"]["eval-base"]["gpu_gib"] > 15  # the 8B's weights
    assert planned("follow-up:t.jsonl")["tokens"]["eval_out"] == 2 * judged["tokens"]["eval_out"]
