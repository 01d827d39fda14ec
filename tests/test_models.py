import pytest
import torch

from ezoforge.errors import ModelError
from ezoforge.export.card import hub_id
from ezoforge.models import bundled_gguf, is_hub_id, load, resolve


def test_bundled_gguf_is_found_without_importing_its_package():
    path = bundled_gguf("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_gguf_converts_once_into_a_safetensors_cache(tmp_path, monkeypatch):
    """The file is parsed once for its tokenizer, config and weights (transformers would parse it three times)."""
    import gguf

    parsed = []
    plain = gguf.GGUFReader

    def counted(path, mode="r"):
        parsed.append(path)
        return plain(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    monkeypatch.setenv("EZO_CACHE_DIR", str(tmp_path))
    folder = resolve("bundled:smollm2-135m-instruct")
    assert len(parsed) == 1
    assert gguf.GGUFReader is counted  # put back once converted
    assert folder.startswith(str(tmp_path))
    files = {p.name for p in (tmp_path / "gguf").rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".")]  # no temp folder left
    mtime = (tmp_path / "gguf").stat().st_mtime_ns
    assert resolve("bundled:smollm2-135m-instruct") == folder  # cached: nothing rewritten
    assert (tmp_path / "gguf").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("spec, message", [
    ("bundled:nope", "unknown bundled model"),
    ("./missing-folder", "no such model folder"),
    ("missing.gguf", "no such GGUF file"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve(spec)


@pytest.mark.parametrize("spec, hub", [
    ("meta-llama/Llama-3.1-8B-Instruct", True),
    ("gpt2", True),  # a one-part canonical id
    ("org/name", False),  # a folder of that name exists here
    ("./models/llama", False),
    ("/models/llama", False),
    ("~/models/llama", False),
    ("runs/demo/merged", False),  # deeper than org/name
    ("model.gguf", False),
    ("bundled:smollm2-135m-instruct", False),
])
def test_hub_id_or_local_path(spec, hub, tmp_path, monkeypatch):
    """The one test loading (check_spec) and the model card (hub_id) both use."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert is_hub_id(spec) is hub
    if not spec.startswith("bundled:"):  # the card names a bundled model by its own hub id
        assert hub_id(spec) == (spec if hub else None)


def test_adapter_folder_passed_as_model_is_explained(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="pass it as --adapter"):
        resolve(str(tmp_path))


def test_model_without_chat_template_needs_one(tmp_path, bundled):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bundled.tokenizer
    saved_template = tok.chat_template
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    try:
        tok.chat_template = None
        tok.save_pretrained(tmp_path)
    finally:
        tok.chat_template = saved_template
    with pytest.raises(ModelError, match="--chat-template"):
        load(str(tmp_path))
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
    loaded = load(str(tmp_path), chat_template=template)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) .startswith("<user>x")


def test_adapter_is_applied(tmp_path, bundled):
    from peft import LoraConfig, get_peft_model

    base = load("bundled:smollm2-135m-instruct")
    peft_model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter = load("bundled:smollm2-135m-instruct", adapter=tmp_path / "adapter")
    ids = bundled.tokenizer("日本の首都は", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = bundled.model(ids).logits
        tuned = with_adapter.model(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-3)
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        load("bundled:smollm2-135m-instruct", adapter=tmp_path)
