"""`ezo export` and `ezo push`: the model card from a real (cut-down) demo run, GGUF files that transformers'
GGUF loader and `ezo generate` read back with the exported model's logits, the Ollama Modelfile, and push --dry-run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import BUNDLED
from ezoforge import gguf_file
from ezoforge.cli import app
from ezoforge.config import DEFAULT_SYSTEM_PROMPT
from ezoforge.errors import ConfigError, EzoError, ModelError
from ezoforge.export.push import push
from ezoforge.export.run import run as export
from ezoforge.export.settings import ExportConfig
from ezoforge.stages import eval_folders

JA_PROMPT = "日本で一番高い山は何ですか？"
runner = CliRunner()


@pytest.fixture(scope="module")
def demo(demo_run) -> Path:
    """The session's demo run (conftest.py): read it, never change it."""
    return demo_run.workdir


@pytest.fixture(scope="module")
def demo_f16(demo):
    """The demo export's f16 GGUF file, read once (its reader parses the whole vocabulary)."""
    import gguf

    return gguf.GGUFReader(next((demo / "export" / "gguf").glob("*-f16.gguf")))


@pytest.fixture(scope="module")
def source() -> Path:
    """The bundled model's folder (its safetensors cache, made once per machine), exported by `exported`."""
    from ezoforge.models import resolve

    return Path(resolve(BUNDLED))


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    """`ezo export` of the bundled model with both GGUF types. The GGUF readback and usage tests read it rather than
    the demo run's export, so they need not wait for the demo run (and run beside it under xdist)."""
    out = tmp_path_factory.mktemp("export") / "out"
    export(source, out, ExportConfig(gguf=["f16", "q8_0"]), DEFAULT_SYSTEM_PROMPT, evals={})
    return out


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """`ezo generate` loads a GGUF file through a dense safetensors cache: keep this test's out of the user's cache
    (only for the test, so the bundled model still resolves to the machine's own cache)."""
    monkeypatch.setenv("EZO_CACHE_DIR", str(tmp_path / "ezo-cache"))


def card_parts(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def load_f32(model_dir, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


def prompt_ids(model_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                    {"role": "user", "content": JA_PROMPT}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt").input_ids


# ---------------------------------------------------------------- the card

def test_card_metadata_and_figures_come_from_the_run(demo):
    out = demo / "export"
    meta, body = card_parts(out)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["language"] == ["ja"]
    assert meta["license"] == "apache-2.0" and {"ezoforge", "lora", "sft", "gguf"} <= set(meta["tags"])
    assert "datasets" not in meta  # the demo reads local files, not hub datasets: nothing to name
    synth = json.loads((demo / "synth" / "stats.json").read_text())
    train = json.loads((demo / "train" / "stats.json").read_text())
    curate = json.loads((demo / "curate" / "stats.json").read_text())
    assert f"Instruction pairs: {synth['pairs']} synthesized from {synth['documents']} documents" in body
    assert f"Curated documents: {curate['docs_out']} kept of {curate['docs_in']} read" in body
    assert f"- optimizer steps: {train['steps']}\n" in body and f"- hardware: {train['hardware']}\n" in body
    base = json.loads((demo / "eval-base" / "report.json").read_text())
    tuned = json.loads((demo / "eval-tuned" / "report.json").read_text())
    ppl = re.search(r"\| held-out perplexity \(lower is better\) \| ([\d.,]+) \| ([\d.,]+) \|", body)
    assert ppl and [float(x.replace(",", "")) for x in ppl.groups()] == pytest.approx(
        [base["perplexity"], tuned["perplexity"]], rel=1e-3)
    assert f"- judge model: {tuned['judge']['model']}\n" in body
    assert f"- judge prompt version: {tuned['prompt_version']}\n" in body
    assert tuned["mean_grade"] is not None  # the scripted judge grades every answer
    assert f"{tuned['ci95'][0]:.4g}, {tuned['ci95'][1]:.4g}]" in body
    assert "- open-ended tasks graded (tuned): 3 of 3\n" in body
    assert "Paired difference in mean grade (tuned − base) over 3 tasks graded in both: " in body
    assert "JCommonsenseQA" not in body  # the run has no accuracy figure, so the card has none
    assert "Apache License 2.0" in body and "![base vs tuned](eval.png)" in body
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                                "tokenizer.json", "README.md", "gguf", "DONE"}


def test_usage_snippet_runs_as_written(exported):
    _, body = card_parts(exported)
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert DEFAULT_SYSTEM_PROMPT in code and str(exported.resolve()) in code
    # As written but for the reply's length: what runs is the same code, a few tokens are as good a proof.
    assert code.count("max_new_tokens=128") == 1
    code = code.replace("max_new_tokens=128", "max_new_tokens=8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


def test_a_model_without_records_gets_a_card_that_invents_nothing(source, tmp_path):
    stats = export(source, tmp_path / "out", ExportConfig(), DEFAULT_SYSTEM_PROMPT, evals={})
    meta, body = card_parts(tmp_path / "out")
    assert "base_model" not in meta and "license" not in meta and stats["evals"] == []
    for absent in ("## Data", "## Training", "## Evaluation", "eval.png"):
        assert absent not in body
    assert "licence (base model not recorded) is unknown" in body and not (tmp_path / "out" / "eval.png").exists()


def test_llama_31_base_gets_its_licence_notice():
    from ezoforge.export.card import licence

    licence_id, notice = licence("meta-llama/Llama-3.1-8B-Instruct")
    assert licence_id == "llama3.1" and "Llama 3.1 Community License" in notice and "Built with Llama" in notice
    assert licence("/models/my-model")[0] is None


def test_rerun_is_a_no_op_and_other_settings_need_force(demo_run):
    demo = demo_run.workdir
    out = demo / "export"
    before = (out / "DONE").stat().st_mtime_ns
    recipe = demo_run.recipe()
    export(demo / "merged", out, recipe.export, recipe.model.system_prompt, evals=eval_folders(demo))
    assert (out / "DONE").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="export.repo: null → \"me/x\""):
        export(demo / "merged", out, ExportConfig(gguf=["f16"], repo="me/x"), recipe.model.system_prompt,
               evals=eval_folders(demo))
    assert (out / "DONE").stat().st_mtime_ns == before and not list(demo.glob(".export.tmp"))


# ---------------------------------------------------------------- GGUF

def test_f16_gguf_reads_back_with_the_source_models_logits(source, exported, gguf_cache):
    from ezoforge.models import resolve

    f16 = next((exported / "gguf").glob("*-f16.gguf"))
    result = runner.invoke(app, ["generate", "--model", str(f16), "--prompt", JA_PROMPT, "--max-new-tokens", "8"])
    assert result.exit_code == 0 and result.stdout.strip(), result.output
    dense = resolve(str(f16))  # transformers' GGUF loader, into the dense cache (`ezo generate` may use llama.cpp)
    ids = prompt_ids(dense)
    assert torch.equal(ids, prompt_ids(source))  # the embedded tokenizer and chat template read back the same
    got = logits(load_f32(dense), ids)
    model = load_f32(source)
    exact = (got - logits(model, ids)).abs().max().item()
    for p in model.parameters():  # the f16 file's weights: float16-rounded, computed in float32 after loading
        p.data = p.data.half().float()
    rounded = (got - logits(model, ids)).abs().max().item()
    print(f"f16 GGUF vs source: max |logit diff| {exact:.4g} (vs float16-rounded weights {rounded:.3g})")
    assert rounded < 1e-3  # all of the difference is float16 rounding of the weights
    assert exact < 0.2


# Slow: gguf-py quantizes the blocks; our writer's path (metadata, tensor names, shapes) is the f16 test's.
@pytest.mark.slow
def test_q8_0_greedy_continuation_matches_the_source_model(source, exported, gguf_cache):
    import gguf

    from ezoforge.models import resolve

    q8 = next((exported / "gguf").glob("*-q8_0.gguf"))
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in gguf.GGUFReader(q8).tensors)
    ids = prompt_ids(source)

    def greedy(model):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()

    want = greedy(load_f32(source))
    got = greedy(load_f32(resolve(str(q8))))  # transformers' GGUF loader, into the dense cache
    matched = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
    print(f"q8_0 GGUF greedy: {matched} of {len(want)} tokens match the source model")
    assert len(want) == 16 and matched == 16


def test_demo_f16_gguf_holds_the_merged_weights(demo, demo_f16, source):
    """The demo's export wrote the merged model's weights, float16-rounded (the readback tests above prove the
    writer on the bundled model); a LoRA-changed tensor tells them from the base model's."""
    from safetensors import safe_open

    name = "model.layers.0.self_attn.v_proj.weight"
    tensor = next(t for t in demo_f16.tensors if t.name == "blk.0.attn_v.weight")
    written = torch.from_numpy(tensor.data.copy())
    with safe_open(demo / "merged" / "model.safetensors", "pt") as merged, \
            safe_open(source / "model.safetensors", "pt") as base:
        want, before = merged.get_tensor(name).half(), base.get_tensor(name).half()
    assert written.dtype == torch.float16 and torch.equal(written, want) and not torch.equal(written, before)


def test_gguf_embeds_tokenizer_template_and_modelfile_matches(demo, demo_f16):
    out = demo / "export" / "gguf"
    fields = {k: f.contents() for k, f in demo_f16.fields.items()
              if k.startswith(("tokenizer.chat", "general.arch", "tokenizer.ggml.model"))}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"] == (demo / "merged" / "chat_template.jinja").read_text()
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith(f"FROM ./{next(out.glob('*-f16.gguf')).name}\n")
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_unsupported_architecture_fails_naming_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="GPT2LMHeadModel"):
        export(tmp_path / "gpt2", tmp_path / "out", ExportConfig(gguf=["f16"]), evals={})
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["export", str(tmp_path / "gpt2"), "--gguf", "f16"])
    assert result.exit_code != 0 and "GPT2LMHeadModel" in str(result.exception)


# ---------------------------------------------------------------- push

def test_push_dry_run_lists_the_model_and_not_the_stage_records(demo):
    result = runner.invoke(app, ["push", str(demo / "export"), "--repo", "someone/ezo-demo", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[-1] for line in result.stdout.splitlines()}
    assert {"README.md", "model.safetensors", "gguf/Modelfile", "eval.png"} <= listed
    assert not listed & {"DONE", "config.yaml", "stats.json"}
    assert next(n for n in listed if n.startswith("gguf/") and n.endswith("-f16.gguf"))


def test_push_needs_a_token_from_the_environment_and_an_export_folder(demo, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        push(demo / "export", "someone/ezo-demo")
    with pytest.raises(EzoError, match="not a finished `ezo export` folder"):
        push(demo / "merged", "someone/ezo-demo", dry_run=True)
    with pytest.raises(ConfigError, match="USER/NAME"):
        push(demo / "export", "no-slash", dry_run=True)


def test_llama31_rope_scaling_becomes_llama_cpp_rope_factors():
    """llama.cpp divides each rotary frequency by its rope_freqs factor: that must give transformers' Llama 3.1
    frequencies (a plain Llama config gets no factors at all)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=scaling)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    factors = gguf_file.rope_factors(cfg.to_dict(), 128)
    assert factors.min() == 1.0 and factors.max() == 8.0
    torch.testing.assert_close(plain / torch.from_numpy(factors), want, rtol=1e-5, atol=0)
    assert gguf_file.rope_factors(LlamaConfig().to_dict(), 64) is None


def test_hub_datasets_are_named_from_their_cache_paths(tmp_path):
    from ezoforge.export.card import metadata
    from ezoforge.export.provenance import RunRecords

    hub = "/data/hf/hub/datasets--HuggingFaceFW--fineweb-2/snapshots/0a1b/data/jpn_Jpan/train/000_00000.parquet"
    rec = RunRecords(tmp_path, curate=[{"stats": {"inputs": [hub, "/data/jawiki.xml.bz2"]}, "output": {}}])
    assert metadata(rec, [])["datasets"] == ["HuggingFaceFW/fineweb-2"]
    assert "datasets" not in metadata(RunRecords(tmp_path), [])
