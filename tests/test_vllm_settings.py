"""synth.vllm: the engine settings a recipe states reach vLLM's constructor, are refused where no vLLM engine
runs, and only the one that changes answers (quantization) is part of the synth folder's fingerprint; synth starts
no CUDA of its own before the engine starts. (vLLM itself is not installable here; the engine's own start and
shutdown are for a GPU machine.)"""
import re

import pytest

from ezoforge.config import output_settings
from ezoforge.errors import ConfigError
from ezoforge.infer.backends import vllm_engine_kwargs
from ezoforge.stages import Recipe, load_recipe
from trainkit import tiny_model  # noqa: F401  (fixtures)


def test_the_recipe_settings_reach_the_engine(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("synth:\n  backend: vllm\n  vllm:\n    tensor_parallel_size: 2\n    quantization: fp8\n"
                      "    gpu_memory_utilization: 0.85\n    max_num_seqs: 64\n    enforce_eager: true\n")
    cfg = load_recipe(recipe).synth.vllm
    assert vllm_engine_kwargs("/models/x", "bfloat16", 7, 4096, cfg) == {
        "model": "/models/x", "dtype": "bfloat16", "seed": 7, "max_model_len": 4096, "tensor_parallel_size": 2,
        "quantization": "fp8", "gpu_memory_utilization": 0.85, "max_num_seqs": 64, "enforce_eager": True}
    # No quantization: the checkpoint's own (vLLM reads an AWQ/GPTQ checkpoint's from its config).
    assert "quantization" not in vllm_engine_kwargs("m", "auto", 0, 2048, Recipe().synth.vllm)
    bnb = load_recipe(None, ["synth.backend=vllm", "synth.vllm.quantization=bitsandbytes"]).synth.vllm
    assert vllm_engine_kwargs("m", "auto", 0, 2048, bnb)["load_format"] == "bitsandbytes"


@pytest.mark.parametrize(("overrides", "message"), [
    (["synth.vllm.quantization=fp8"], "vllm.quantization is a vllm-backend setting; backend 'auto'"),
    (["synth.backend=vllm", "synth.vllm.gpu_memory_utilization=1.5"], "less than or equal to 1"),
    (["synth.backend=vllm", "synth.vllm.quantization=int3"], "synth.vllm.quantization"),
])
def test_engine_settings_are_checked_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(None, overrides)


def test_a_resolved_recipe_with_default_engine_settings_loads_on_any_backend():
    # `ezo validate` prints every key; the defaults of synth.vllm do not stop it loading with another backend.
    plain = Recipe().model_dump(mode="json")
    assert Recipe.model_validate(plain).synth.backend == "auto"


def test_only_quantization_shapes_the_synth_output():
    base = load_recipe(None, ["synth.backend=vllm"]).synth
    tuned = load_recipe(None, ["synth.backend=vllm", "synth.vllm.gpu_memory_utilization=0.5",
                               "synth.vllm.max_num_seqs=8", "synth.vllm.tensor_parallel_size=4",
                               "synth.vllm.enforce_eager=true"]).synth
    assert output_settings(base) == output_settings(tuned)
    fp8 = load_recipe(None, ["synth.backend=vllm", "synth.vllm.quantization=fp8"]).synth
    assert output_settings(fp8)["vllm"] == {"quantization": "fp8"} != output_settings(base)["vllm"]


# Every torch.cuda entry point that initializes CUDA in this process: a context (_lazy_init, which tensors on the
# card, mem_get_info, set_device... go through) or the driver (is_available's default check calls cudaGetDeviceCount,
# which runs cuInit; a vLLM worker forked after that cannot start CUDA). device_count reads NVML and is left alone.
CUDA_STARTERS = ("is_available", "init", "_lazy_init", "mem_get_info", "get_device_properties", "set_device",
                 "current_device", "get_device_name", "get_device_capability", "is_bf16_supported", "synchronize",
                 "empty_cache", "memory_allocated", "memory_reserved")


class EngineStart(Exception):
    """Raised by the stand-in vllm where the real engine would start."""


@pytest.fixture
def cuda_guard(monkeypatch) -> list[str]:
    """Every CUDA starter raises and is recorded (the list returned); `vllm` is a stand-in module (the third-party
    import boundary) whose engine constructor raises EngineStart where the real engine would start."""
    import importlib.machinery
    import sys
    import types

    import torch

    started = []

    def forbidden(name):
        def call(*args, **kwargs):
            started.append(name)
            raise AssertionError(f"torch.cuda.{name} before the vLLM engine started")
        return call

    for name in CUDA_STARTERS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", forbidden("_cuda_getDeviceCount"), raising=False)

    def engine(**kwargs):
        raise EngineStart(kwargs)

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = engine, lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    return started


def test_synth_touches_no_cuda_before_the_vllm_engine_starts(tiny_model, tmp_path, cuda_guard):  # noqa: F811
    """vLLM gets the whole card: synth checks the model, computes its identity for the cache keys and sizes its
    requests without starting CUDA in its own process."""
    from ezoforge.synth.run import run

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "富士山は日本で一番高い山です。静岡県と山梨県にまたがっています。"}\n', encoding="utf-8")
    recipe = load_recipe(None, [f"model.name={tiny_model}", "synth.backend=vllm", "synth.pairs_per_doc=1",
                                "synth.generation.max_new_tokens=16", "synth.max_passage_tokens=64"])
    with pytest.raises(EngineStart) as engine_start:
        run(recipe, docs, tmp_path / "synth")
    assert cuda_guard == []
    assert engine_start.value.args[0]["model"] == tiny_model


def test_eval_touches_no_cuda_before_the_vllm_engine_starts(tiny_model, tmp_path, cuda_guard):  # noqa: F811
    """The same for eval's answers from vLLM: the model's checks and identity leave CUDA to the engine."""
    from ezoforge.eval.run import run

    recipe = load_recipe(None, [f"model.name={tiny_model}", "eval.backend=vllm", "eval.tasks=[elyza100:bundled:tasks/"
                                "demo-tasks.jsonl]", "eval.limit=1", f"eval.cache={tmp_path / 'requests.sqlite'}"])
    with pytest.raises(EngineStart) as engine_start:
        run(recipe, tmp_path / "eval")
    assert cuda_guard == []
    assert engine_start.value.args[0]["model"] == tiny_model
