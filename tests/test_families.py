"""Bases beyond Llama through every stage: Qwen3, Gemma 3 (text model and multimodal checkpoint) and Mistral, as tiny
random models built offline (families.py) with their families' tokenizers and chat templates.

Per family: the labels a chat template gives, then train (LoRA, and QLoRA through bitsandbytes on this CPU) -> merge
(equal to peft's on every tensor) -> eval (perplexity, choices, judged answers; llama.cpp runs the merged model) ->
generate, chat and serve -> export --gguf f16, whose logits llama.cpp must reproduce."""
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import ezo_in_process
from ezoforge.config import bundled_data
from ezoforge.errors import ModelError
from ezoforge.eval.run import run as eval_run
from ezoforge.export.card import GEMMA3_NOTICE, MISTRAL_NOTICE, QWEN3_NOTICE
from ezoforge.export.run import run as export_run
from ezoforge.export.settings import ExportConfig
from ezoforge.stages import load_recipe
from ezoforge.train import merge
from ezoforge.train import run as train_run
from ezoforge.turns import IGNORE, encode
from families import ARCHITECTURES, TOKENIZERS, make_tiny, make_tiny_multimodal
from scripted_judge import ScriptedJudge
from trainkit import assert_merge_equals_peft, elyza_rows, overrides  # noqa: F401  (fixtures)

FAMILIES = list(ARCHITECTURES)
CONVERSATION = [{"role": "system", "content": "あなたは親切な日本語のアシスタントです。"},
                {"role": "user", "content": "日本の首都はどこですか？"}, {"role": "assistant", "content": "東京です。"},
                {"role": "user", "content": "では、大阪は？"}, {"role": "assistant", "content": "西日本の大きな都市です。"}]
# What each template trains on: the replies, each through its end-of-turn token; Qwen3's last reply with the empty
# think block its template writes there (earlier replies lose theirs).
LEARNED = {"qwen3": ["東京です。<|im_end|>", "<think>\n\n</think>\n\n西日本の大きな都市です。<|im_end|>"],
           "gemma3": ["東京です。<end_of_turn>", "西日本の大きな都市です。<end_of_turn>"],
           "mistral": ["東京です。</s>", "西日本の大きな都市です。</s>"]}
TEXT = "東京は日本の首都です。富士山は日本で一番高い山で、季節は春夏秋冬の四つです。Hello, world! 123 と 4567。"
NOTICES = {"qwen3": QWEN3_NOTICE, "gemma3": GEMMA3_NOTICE, "mistral": MISTRAL_NOTICE}
# llama.cpp on our f16 GGUF against transformers in float32, at every position of TEXT.
MAX_LOGIT_DIFF, MIN_TOP1 = 0.1, 0.9


def learned_runs(tokenizer, messages) -> list[str]:
    enc = encode(tokenizer, messages)
    runs, run = [], []
    for token, label in zip(enc["input_ids"] + [None], enc["labels"] + [IGNORE]):
        if label == IGNORE:
            if run:
                runs.append(tokenizer.decode(run))
            run = []
        else:
            run.append(token)
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_template_teaches_the_replies_alone(family):
    tok = TOKENIZERS[family]()
    assert learned_runs(tok, CONVERSATION) == LEARNED[family]
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    if family == "gemma3":  # no system role: the system prompt opens the first user turn
        assert text.startswith("<bos><start_of_turn>user\nあなたは親切な日本語のアシスタントです。\n\n日本の首都はどこですか？")
    if family == "mistral":  # its template drops the system prompt from a conversation that ends in a reply
        assert "あなたは親切" not in text
        single = learned_runs(tok, CONVERSATION[:2] + [CONVERSATION[2]])
        assert single == ["東京です。</s>"]


@pytest.fixture(scope="module", params=FAMILIES + ["gemma3-multimodal"])
def family_base(request, tmp_path_factory) -> tuple[str, str]:
    family = request.param
    out = tmp_path_factory.mktemp(f"{family}-tiny".replace("mistral", "mistral-7b"))  # the card reads the name
    return family, (make_tiny_multimodal(out) if family == "gemma3-multimodal" else make_tiny(family, out))


@pytest.fixture(scope="module")
def judge():
    with ScriptedJudge() as scripted:
        yield scripted


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def assert_q8_0_holds_the_f16_weights(q8: Path, f16: Path) -> None:
    """The q8_0 file is the f16 one with its matrices in 8-bit blocks: the same tensors and metadata, each weight
    within half a block step. (llama.cpp's CPU build here crashes on any Q8_0 model, its own llama-quantize output
    included, so the file is checked by gguf-py's dequantizer.)"""
    import gguf

    wide, narrow = gguf.GGUFReader(f16), gguf.GGUFReader(q8)
    assert {k for k in wide.fields} == {k for k in narrow.fields}
    by_name = {t.name: t for t in wide.tensors}
    assert [t.name for t in narrow.tensors] == list(by_name)
    quantized = 0
    for t in narrow.tensors:
        ref = np.asarray(by_name[t.name].data, dtype=np.float32)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        step = np.abs(ref).reshape(-1, 32).max(-1, keepdims=True) / 127 if ref.shape[-1] % 32 == 0 else 0
        assert (np.abs(got - ref).reshape(-1, 32 if ref.shape[-1] % 32 == 0 else ref.shape[-1])
                <= step / 2 + 1e-3).all(), t.name
        quantized += t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert quantized >= 7  # every matrix of a block


def test_every_stage(family_base, elyza_rows, judge, shared_data, tmp_path):  # noqa: F811
    family, base = family_base
    steps = dict(max_steps=2, save_every=2, max_length=192, eval_fraction=0.0)

    # train: LoRA, then QLoRA (4-bit NF4 through bitsandbytes, which runs on this CPU)
    lora = train_run.run(load_recipe(None, overrides(base, **steps)), [elyza_rows], tmp_path / "train")
    assert lora["steps"] == 2 and all(np.isfinite([lora["train_loss_first"], lora["train_loss_last"]]))
    adapter = json.loads((tmp_path / "train" / "adapter" / "adapter_config.json").read_text())
    if family == "gemma3-multimodal":  # the language model's layers only; the vision tower is left as it is
        assert "language_model" in str(adapter["target_modules"])
    qlora = train_run.run(load_recipe(None, overrides(base, **{**steps, "max_steps": 1, "qlora": True})),
                          [elyza_rows], tmp_path / "train-4bit")
    assert qlora["qlora"] is True and qlora["kernels"]["linear4bit_modules"] > 0

    # merge: peft's merge on every tensor (tied embeddings stay tied, a vision tower passes through)
    merged = tmp_path / "merged"
    merge.run(tmp_path / "train", merged, "float32")
    assert_merge_equals_peft(base, tmp_path / "train", merged, torch.float32)

    # export: a GGUF llama.cpp reads with transformers' logits, and an Ollama Modelfile
    export_run(merged, tmp_path / "export", ExportConfig(gguf=["f16", "q8_0"]), evals={})
    gguf = next((tmp_path / "export" / "gguf").glob("*-f16.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(gguf, ids)
    diff, top1 = float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{family}: llama.cpp on the f16 GGUF vs transformers over {len(ids)} positions: max |logit diff| "
          f"{diff:.5f}, same top-1 at {top1:.0%}")
    assert diff < MAX_LOGIT_DIFF and top1 >= MIN_TOP1, (diff, top1)
    assert_q8_0_holds_the_f16_weights(next((tmp_path / "export" / "gguf").glob("*-q8_0.gguf")), gguf)
    import llama_cpp

    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    assert vocab.tokenize(TEXT.encode(), add_bos=False) == ids  # llama.cpp splits text as training did
    end = {"qwen3": "<|im_end|>", "gemma3": "<end_of_turn>", "mistral": "</s>"}[family.split("-")[0]]
    modelfile = (tmp_path / "export" / "gguf" / "Modelfile").read_text()
    assert f'PARAMETER stop "{end}"' in modelfile and 'TEMPLATE """' in modelfile and end in modelfile
    assert NOTICES[family.split("-")[0]] in (tmp_path / "export" / "README.md").read_text()

    # eval: perplexity, choices and judged answers on the merged model (`auto`: llama.cpp runs it)
    recipe = load_recipe(extra={"model": {"name": str(merged)}, "eval": {
        "tasks": ["ppl:bundled:heldout/heldout-ja.jsonl",
                  f"jcqa:{shared_data / 'jglue/jcommonsenseqa/valid-v1.3.json'}",
                  f"elyza100:{bundled_data('bundled:tasks/demo-tasks.jsonl')}"],
        "limit": 2, "judge_url": judge.url, "judge_model": "scripted", "judge_reasks": 0,
        "cache": str(tmp_path / "requests.sqlite"), "generation": {"max_new_tokens": 8}}})
    report = eval_run(recipe, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "DONE").read_text())["settings"]["output"]["eval"]["backend"] == "llamacpp"
    assert report["perplexity"] > 1 and report["n_choice_items"] == 2 and 0 <= report["accuracy"] <= 1
    assert report["n_scored"] == 2 and 1 <= report["mean_grade"] <= 10  # empty answers are graded without a call

    # generate (both engines), chat, serve
    for backend in ("transformers", "llamacpp"):
        result = ezo_in_process("generate", "--model", merged, "--prompt", "日本の首都は？", "--max-new-tokens", "6",
                                "--backend", backend)
        assert result.returncode == 0 and result.stdout.endswith("\n"), result.stderr[-2000:]
    from ezoforge.infer.chat import repl
    from ezoforge.infer.generate import Generator, Sampling
    from ezoforge.infer.serve import BackgroundServer, create_app
    from ezoforge.models import load

    gen = Generator(load(str(merged)))
    said = []
    lines = iter(["こんにちは", "/exit"])
    repl(gen, "短く答えてください。", Sampling(max_new_tokens=6), read=lambda _: next(lines), write=said.append)
    assert said[0].startswith("ezo chat") and said[-1] == "\n"  # a random model's reply may be all special tokens
    reply = gen.complete([[{"role": "user", "content": "日本の首都は？"}]], Sampling(max_new_tokens=6))[0]
    assert 0 < reply.completion_tokens <= 6 and reply.finish_reason in ("stop", "length")
    with BackgroundServer(create_app(gen, family)) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": family, "max_tokens": 6,
            "messages": [{"role": "system", "content": "短く。"}, {"role": "user", "content": "日本の首都は？"}]}).json()
    assert reply["choices"][0]["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] > 0


def test_plan_reads_each_familys_shape_from_its_config(family_base):
    """Linear layers (q and o sized by head_dim, not hidden) and embeddings (once when tied): every weight but the
    norms, and a multimodal checkpoint's language model alone."""
    from transformers import AutoModelForCausalLM

    from ezoforge.sizing import model_shape

    _, base = family_base
    model = AutoModelForCausalLM.from_pretrained(base)
    counted = sum(p.numel() for name, p in model.named_parameters()
                  if "norm" not in name and "vision_tower" not in name and "multi_modal_projector" not in name)
    assert model_shape(base).params == counted


def test_an_architecture_outside_the_families_fails_before_any_weights_load(elyza_rows, tmp_path):  # noqa: F811
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    for command in (["train", elyza_rows, "--model", tmp_path / "gpt2", "--out", tmp_path / "t"],
                    ["generate", "--model", tmp_path / "gpt2", "--prompt", "x"],
                    ["eval", "--model", tmp_path / "gpt2", "--tasks", "ppl:bundled:heldout/heldout-ja.jsonl",
                     "--out", tmp_path / "e"]):
        result = ezo_in_process(*command)
        assert result.returncode != 0 and "architectures: ezoforge supports" in result.stderr, result.stderr[-800:]
        assert "GPT2LMHeadModel" in result.stderr and "Qwen3ForCausalLM" in result.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        from ezoforge.models import check_model_folder

        check_model_folder(tmp_path / "gpt2")


@pytest.mark.parametrize("config, complaint", [
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, "max_position_embeddings": 32768},
     "sliding_window 4096"),
    ({"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 6, "hidden_size": 64, "num_attention_heads": 4,
      "head_dim": 32, "query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
])
def test_gguf_export_refuses_what_llama_cpp_would_compute_otherwise(tmp_path, config, complaint):
    from ezoforge import gguf_file

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=complaint):
        gguf_file.check(tmp_path)
