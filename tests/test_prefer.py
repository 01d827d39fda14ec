"""`ezo prefer`: preference pairs graded by the (scripted) judge, DPO continuing the SFT adapter, kill/resume."""
import json
from collections import Counter

import pytest
import torch

from ezoforge.errors import ConfigError
from ezoforge.prefer import run as prefer_run
from ezoforge.prefer.pairs import best_and_worst
from ezoforge.stage import Stage
from ezoforge.stages import load_recipe
from ezoforge.train import run as train_run
from ezoforge.train.progress import read_metrics
from conftest import REPO
from scripted_judge import answer_of, expected_grade
from trainkit import overrides, tiny_model, train_until_killed  # noqa: F401  (fixtures)

PAIRS = [("日本の首都はどこですか。", "日本の首都は東京です。"),
         ("富士山の高さを教えてください。", "富士山の高さは3776メートルです。"),
         ("「ありがとう」を英語にしてください。", "Thank you です。"),
         ("1たす1はいくつですか。", "1たす1は2です。"),
         ("春の季語を一つ挙げてください。", "桜が春の季語です。"),
         ("水の沸点は何度ですか。", "1気圧で100度です。"),
         ("日本で一番長い川は何ですか。", "信濃川です。"),
         ("俳句は何音でできていますか。", "五・七・五の十七音です。")]
PREFER = ["prefer.samples=2", "prefer.limit=6", "prefer.min_margin=1", "prefer.generation.max_new_tokens=6",
          "prefer.generation.batch_size=4", "prefer.max_steps=4", "prefer.save_every=2", "prefer.batch_size=2",
          "prefer.learning_rate=5e-3", "prefer.max_length=256", "prefer.eval_fraction=0.2"]


@pytest.fixture(scope="module")
def sft(tiny_model, tmp_path_factory):  # noqa: F811
    """A finished SFT folder of the tiny model, trained on the hand-written pairs above."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "doc_id": f"d{i}", "instruction": q, "response": a},
                                       ensure_ascii=False) + "\n" for i, (q, a) in enumerate(PAIRS)), encoding="utf-8")
    out = root / "train"
    train_run.run(load_recipe(None, overrides(tiny_model, max_steps=2)), [data], out)
    return out


def recipe(tiny_model, judge, *more):  # noqa: F811
    return load_recipe(None, [f"model.name={tiny_model}", "train.gradient_checkpointing=false",
                              f"eval.judge_url={judge.url}", "eval.judge_model=scripted", *PREFER, *more])


@pytest.fixture(scope="module")
def judged(tiny_model, sft, tmp_path_factory):  # noqa: F811
    from scripted_judge import ScriptedJudge

    out = tmp_path_factory.mktemp("prefer") / "run"
    with ScriptedJudge() as judge:
        stats = prefer_run.run(recipe(tiny_model, judge), sft, out)
        yield out, stats, judge


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_candidates_are_graded_as_the_judge_said_and_pairs_keep_the_margin(judged):
    out, stats, judge = judged
    cands = rows(out / "candidates.jsonl")
    assert stats["instructions"] == 6 and len(cands) == 6 * 3 == stats["candidates"]  # 2 samples + the reference
    assert Counter(c["source"] for c in cands) == {"sample": 12, "reference": 6}
    for c in cands:
        assert c["grade"] == expected_grade(c["text"]), c
    # The judge saw each non-empty candidate once, with no reference answer in its prompt.
    asked = [answer_of(r["messages"]) for r in judge.requests]
    assert sorted(asked) == sorted(c["text"] for c in cands if c["text"].strip())
    assert all("# 正解例\n（なし）" in r["messages"][1]["content"] for r in judge.requests)
    verdicts = rows(out / "verdicts.jsonl")
    assert len(verdicts) == 18 and {v["judge_served"] for v in verdicts if v["answer"].strip()} \
        == {"scripted-judge-2026-12-01"}

    pairs = rows(out / "data" / "pairs.jsonl")
    by_ins = {}
    for c in cands:
        by_ins.setdefault(c["instruction_id"], []).append(c)
    expected = {}
    for ins, cs in by_ins.items():
        best, worst = best_and_worst(cs)
        margin = best["grade"] - worst["grade"]
        expected[ins] = margin
        kept = [p for p in pairs if p["id"] == ins]
        if margin >= 1 and best["text"] != worst["text"]:
            (p,) = kept
            assert (p["chosen"], p["rejected"], p["margin"]) == (best["text"], worst["text"], margin)
            grades = [c["grade"] for c in cs]
            assert (p["chosen_grade"], p["rejected_grade"]) == (max(grades), min(grades))
            assert p["prompt"][-1] == {"role": "user", "content": p["instruction"]}
        else:
            assert not kept
    assert stats["pairs"] == len(pairs) > 0
    assert stats["margin_histogram"] == {f"{m:g}": n for m, n in sorted(Counter(expected.values()).items())}
    assert stats["below_margin"] == sum(m < 1 for m in expected.values())
    assert all(p["id"] in {f"p{i}" for i in range(len(PAIRS))} for p in pairs)  # drawn from the SFT's pairs


def test_dpo_folder_is_the_sft_adapter_updated_and_merge_accepts_it(judged, sft):
    from safetensors.torch import load_file

    from ezoforge.train.merge import trained

    out, stats, _ = judged
    info = trained(out)  # merge's contract: adapter/adapter_config.json and DONE naming the base
    assert info.stage == "prefer" and info.settings["model"]["name"] == json.loads(
        (sft / "DONE").read_text())["settings"]["model"]["name"]
    assert not (out / "adapter" / "ref").exists()
    assert stats["dpo_steps"] == 4 and stats["dpo_loss_first"] is not None
    dpo = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_file(sft / "adapter" / "adapter_model.safetensors")
    assert dpo.keys() == base.keys()
    moved = [k for k in dpo if not torch.equal(dpo[k], base[k])]
    assert moved
    # Continued, not restarted: a fresh adapter would draw A anew (relative distance ~1.4); DPO's moved A a little.
    for k in (k for k in dpo if "lora_A" in k):
        assert (dpo[k] - base[k]).norm() < 0.5 * base[k].norm(), k
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_rerun_is_a_no_op_and_force_reuses_every_answer_and_verdict(judged, tiny_model, sft, tmp_path):  # noqa: F811
    import shutil

    done, stats, judge = judged
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    sent = len(judge.requests)
    again = prefer_run.run(recipe(tiny_model, judge), sft, out)
    assert again == stats and len(judge.requests) == sent
    # A changed output setting is refused, naming it, and nothing is touched.
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match="prefer.max_steps: 4 → 1"):
        prefer_run.run(recipe(tiny_model, judge, "prefer.max_steps=1"), sft, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    # --force redoes the stage (one DPO step here) with every answer and verdict from the folder's cache.
    redone = prefer_run.run(recipe(tiny_model, judge, "prefer.max_steps=1"), sft, out, force=True)
    assert len(judge.requests) == sent
    assert redone["answers_cached"] == 12 and redone.get("answers_computed", 0) == 0
    assert redone["judge_sent"] == 0 and redone["judge_cached"] == sent
    assert rows(out / "data" / "pairs.jsonl") == rows(done / "data" / "pairs.jsonl")
    assert redone["dpo_steps"] == 1 and redone["margin_histogram"] == stats["margin_histogram"]


def test_needs_a_judge_and_refuses_another_base(tiny_model, sft, tmp_path, scripted_judge):  # noqa: F811
    with pytest.raises(ConfigError, match="stage prefer grades answers with the recipe's judge"):
        load_recipe(None, ["stages=[train, prefer]"])  # before any stage runs
    with pytest.raises(ConfigError, match="eval.judge_model"):
        prefer_run.run(load_recipe(None, [f"model.name={tiny_model}"]), sft, tmp_path / "a")
    with pytest.raises(ConfigError, match="model.name"):
        prefer_run.run(recipe("bundled:smollm2-135m-instruct", scripted_judge), sft, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- DPO on hand-written pairs

def preference_rows(n: int, offset: int = 0) -> list[dict]:
    """Polite Japanese chosen over a curt English reply: a pattern a 2-layer model can learn in a few steps."""
    return [{"prompt": [{"role": "user", "content": f"質問{i}: 今日の天気はどうですか。"}],
             "chosen": "はい、今日は晴れです。", "rejected": "No idea."} for i in range(offset, offset + n)]


def logp_margin(model, tokenizer, pairs) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected), each summed over the answer's tokens (an own scorer)."""
    def logp(prompt, answer):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False, return_tensors="pt").input_ids
        start = len(tokenizer(head, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().log_softmax(-1)
        return logits[0, start - 1:-1].gather(-1, ids[0, start:, None]).sum().item()

    return sum(logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs) / len(pairs)


def test_dpo_raises_the_held_out_margin_lowers_the_loss_and_keeps_the_reference_frozen(  # noqa: F811
        tiny_model, sft, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ezoforge.models import load_tokenizer
    from ezoforge.prefer.settings import PreferConfig
    from ezoforge.train import dpo
    from ezoforge.train.settings import TrainConfig

    cfg = PreferConfig(learning_rate=5e-3, max_steps=6, batch_size=2, save_every=100, max_length=128)
    train = TrainConfig(gradient_checkpointing=False, qlora=False)
    tokenizer = load_tokenizer(tiny_model)
    pairs, held = preference_rows(8), preference_rows(4, offset=100)
    out = tmp_path / "dpo"
    stage = Stage("prefer", out, {"test": 1})
    stage.start()
    stats = dpo.train_dpo(tiny_model, "float32", sft / "adapter", tokenizer, cfg, train, pairs, held, out, stage,
                          torch.device("cpu"), qlora=False)
    before, after = stats["held_out_before"], stats["held_out_after"]
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: log 2
    assert after["loss"] < before["loss"] and after["logp_margin"] > before["logp_margin"]
    assert stats["dpo_loss_last"] < stats["dpo_loss_first"]

    # The same, measured independently on the saved adapters: SFT alone vs SFT after DPO.
    def scored(adapter):
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        return logp_margin(PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer, held)

    sft_margin, dpo_margin = scored(sft / "adapter"), scored(out / "adapter")
    assert dpo_margin > sft_margin
    assert sft_margin == pytest.approx(before["logp_margin"], abs=1e-2)
    assert dpo_margin == pytest.approx(after["logp_margin"], abs=1e-2)

    # The reference adapter: the SFT's weights, frozen, untouched by the optimizer.
    model = dpo.load_policy(tiny_model, sft / "adapter", train, torch.device("cpu"), False, "float32")
    trainer = dpo.make_trainer(model, tokenizer, cfg.model_copy(update={"max_steps": 3}), train, pairs, [],
                               tmp_path / "staging", torch.device("cpu"))
    sft_weights = load_file(sft / "adapter" / "adapter_model.safetensors")
    ref = {n: p for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert ref and not any(p.requires_grad for p in ref.values())
    for n, p in ref.items():
        assert torch.equal(p.detach(), sft_weights[n.replace(".ref.", ".")]), n
    trainer.train()
    assert all(torch.equal(p.detach(), sft_weights[n.replace(".ref.", ".")]) for n, p in ref.items())
    trained = {n: p for n, p in trainer.model.named_parameters() if ".default." in n}
    assert any(not torch.equal(p.detach(), sft_weights[n.replace(".default.", ".")]) for n, p in trained.items())


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(judged, tiny_model, sft, tmp_path):  # noqa: F811
    straight, stats, judge = judged
    killed = tmp_path / "killed"
    args = [str(sft), *(a for o in [f"model.name={tiny_model}", "train.gradient_checkpointing=false",
                                    f"eval.judge_url={judge.url}", "eval.judge_model=scripted", *PREFER]
                        for a in ("--set", o))]
    train_until_killed(args, killed, step=2, command="prefer")
    resumed = prefer_run.run(recipe(tiny_model, judge), sft, killed)
    assert resumed["resumed_from_step"] == 2 and resumed["dpo_steps"] == 4
    assert resumed["answers_cached"] == 12 and resumed["judge_sent"] == 0  # the killed run's requests were kept
    assert rows(killed / "data" / "pairs.jsonl") == rows(straight / "data" / "pairs.jsonl")
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]  # the SFT model's held-out loss, then each step
    for ra, rb in zip(a, b):
        assert rb.get("loss") == pytest.approx(ra.get("loss"), abs=1e-5), (ra, rb)
        assert rb.get("eval_loss") == pytest.approx(ra.get("eval_loss"), abs=1e-5), (ra, rb)
    assert resumed["dpo_loss_last"] == pytest.approx(stats["dpo_loss_last"], abs=1e-5)


def test_merging_the_dpo_folder_gives_base_plus_the_dpo_adapter(judged, tiny_model, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ezoforge.train import merge

    out, _, _ = judged
    merge.run(out, tmp_path / "merged", "float32")
    ids = torch.tensor([[1, 50, 300, 7, 900, 42]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                        str(out / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_pipeline_puts_prefer_between_train_and_merge_and_evaluates_three_models():
    from ezoforge.pipeline import forced_steps, steps

    r = load_recipe(None, ["stages=[curate, synth, train, merge, prefer, eval]", "eval.judge_url=local",
                           "eval.judge_model=bundled:smollm2-135m-instruct"])
    assert steps(r) == ["curate", "synth", "train", "prefer", "merge", "eval-base", "eval-sft", "eval-tuned"]
    assert forced_steps(steps(r), ["train"]) == {"train", "prefer", "merge", "eval-base", "eval-sft", "eval-tuned"}
    assert forced_steps(steps(r), ["prefer"]) == {"prefer", "merge", "eval-tuned"}


def test_plan_counts_sampling_judge_calls_and_dpo():
    from ezoforge.plan import plan

    # The demo's data makes at least 16 synthesized pairs: 10 instructions are drawn from them.
    r = load_recipe(REPO / "recipes" / "demo.yaml", ["stages=[train, prefer]", "prefer.limit=10", "prefer.samples=3",
                                                     "eval.judge_url=x",
                           "eval.judge_model=y", "eval.judgments=2", "eval.judge_temperature=0.7",
                           "prefer.generation.max_new_tokens=200", "prefer.max_steps=50", "prefer.batch_size=2",
                           "prefer.max_length=1024"])
    p = plan(r, "h100")["stages"]["prefer"]
    assert p["sample_tokens"] == 10 * 3 * 200
    assert p["judge_calls"] == 10 * (3 + 1) * 2  # the synthesized reference is a candidate too
    assert p["dpo_tokens"] == 50 * 2 * 2 * 1024  # two sequences per pair
    assert p["fits"] and p["gpu_gib"] > 0 and p["hours"] is not None
