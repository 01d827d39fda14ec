"""synth.vllm: the engine settings a recipe states reach vLLM's constructor, are refused where no vLLM engine
runs, and only the one that changes answers (quantization) is part of the synth folder's fingerprint.
(vLLM itself is not installable here; the engine's own start and shutdown are for a GPU machine.)"""
import re

import pytest

from ezoforge.config import Recipe, load_recipe, output_settings
from ezoforge.errors import ConfigError
from ezoforge.infer.backends import vllm_engine_kwargs


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
