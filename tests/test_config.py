import pytest

from ezoforge.config import DEFAULT_SYSTEM_PROMPT, diff_keys, dump_yaml, fingerprint, parse_overrides, redact
from ezoforge.errors import ConfigError
from ezoforge.stage import Stage
from ezoforge.stages import load_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_use_bundled_model_and_seed_system_prompt():
    recipe = load_recipe()
    assert recipe.model.name == "bundled:smollm2-135m-instruct"
    assert recipe.model.system_prompt == DEFAULT_SYSTEM_PROMPT


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = write(tmp_path, "workdir: runs/x\ntrain:\n  lora_r: 8\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert f"{path}:4: train.learnig_rate: unknown key" in str(e.value)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: train.max_steps: .*integer"):
        load_recipe(path)


@pytest.mark.parametrize("overrides, message", [
    (["train.max_steps=5", "train.epochs=1"], "set max_steps or epochs, not both"),
    (["eval.judge_url=http://127.0.0.1:1/v1"], "judge_url and judge_model go together"),
    (["synth.backend=openai"], "needs base_url"),
    (["generation.temperature=3"], "generation.temperature"),
])
def test_contradictions_fail_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, overrides)


def test_dotted_overrides_parse_yaml_scalars():
    recipe = load_recipe(None, ["train.max_steps=10", "train.packing=false", "model.name=some/model"])
    assert recipe.train.max_steps == 10 and recipe.train.packing is False and recipe.model.name == "some/model"
    assert parse_overrides(["a.b.c=1.5"]) == {"a": {"b": {"c": 1.5}}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_recipe(None, ["train.nope=1"])


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="a recipe is a mapping"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_secrets_are_redacted_and_env_names_kept(tmp_path):
    plain = {"judge_api_key_env": "OPENAI_API_KEY", "api_key": "sk-secret", "nested": [{"token": "t"}]}
    assert redact(plain) == {"judge_api_key_env": "OPENAI_API_KEY", "api_key": "***", "nested": [{"token": "***"}]}
    # Token counts are settings, not secrets: they must reach saved configs and fingerprints.
    assert redact({"max_new_tokens": 64, "hf_token": "x"}) == {"max_new_tokens": 64, "hf_token": "***"}
    # A recipe cannot hold a key (it names the environment variable) and the refusal does not echo it.
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: synth.api_key: unknown key") as e:
        load_recipe(write(tmp_path, "synth:\n  api_key: sk-secret-1\n"))
    assert "sk-secret-1" not in str(e.value)
    recipe = load_recipe(None, ["eval.judge_api_key_env=MY_JUDGE_KEY"])
    assert "judge_api_key_env: MY_JUDGE_KEY" in dump_yaml(recipe)
    # What a stage saves (config.yaml, DONE) holds no secret value, whatever its settings carry.
    settings = {"synth": {"api_key_env": "OPENAI_API_KEY", "hf_token": "hf-secret-2", "max_new_tokens": 64}}
    stage = Stage("synth", tmp_path / "out", settings)
    stage.start()
    stage.finish({})
    for name in ("config.yaml", "DONE"):
        saved = (tmp_path / "out" / name).read_text(encoding="utf-8")
        assert "hf-secret-2" not in saved and "OPENAI_API_KEY" in saved and "64" in saved, name


def test_fingerprint_and_diff():
    a, b = load_recipe(), load_recipe(None, ["train.lora_r=8"])
    assert fingerprint(a.train) != fingerprint(b.train)
    assert fingerprint(a.train) == fingerprint(load_recipe().train)
    assert diff_keys({"x": 1, "y": {"z": 2}}, {"x": 1, "y": {"z": 3}}) == ["y.z"]


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    recipes = [r for r in recipes if not r.name.startswith("accelerate")]
    assert any(r.name == "demo.yaml" for r in recipes)
    for r in recipes:
        load_recipe(r)
