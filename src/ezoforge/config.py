"""Recipe configuration: one pydantic model per stage, YAML + dotted overrides, fingerprints.

Every model forbids unknown keys so a typo fails before any work, naming the key path
(and the YAML line when the recipe came from a file).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ezoforge.errors import ConfigError

# The seed model card's own system prompt (Llama-3.1-70B-EZO-1.1-it).
DEFAULT_SYSTEM_PROMPT = "あなたは誠実で優秀な日本人のアシスタントです。特に指示が無い場合は、原則日本語で回答してください。"
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
STAGES = ("curate", "synth", "train", "merge", "eval")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The base model every stage starts from."""

    name: str = BUNDLED_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    chat_template: Path | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT


class GenerationConfig(Section):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class CurateConfig(Section):
    inputs: list[str] = []
    workers: int = Field(1, ge=1)
    on_error: Literal["fail", "skip"] = "fail"


class SynthConfig(Section):
    model: str | None = None  # None: the recipe's base model
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    base_url: str | None = None
    api_key_env: str | None = None
    mode: Literal["prompted", "synthesizer"] = "prompted"
    pairs_per_doc: int = Field(3, ge=1)
    limit: int | None = Field(None, ge=1)
    concurrency: int = Field(4, ge=1)
    generation: GenerationConfig = GenerationConfig(max_new_tokens=400)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "SynthConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        return self


class TrainConfig(Section):
    qlora: bool | None = None  # None: QLoRA where bitsandbytes 4-bit works (CUDA), LoRA otherwise
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(2e-4, gt=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=16)
    packing: bool = True
    gradient_checkpointing: bool = True
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        return self


class MergeConfig(Section):
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"


class EvalConfig(Section):
    tasks: list[str] = ["elyza100"]
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    limit: int | None = Field(None, ge=1)
    concurrency: int = Field(4, ge=1)
    allow_partial: bool = False
    generation: GenerationConfig = GenerationConfig(max_new_tokens=512)

    @model_validator(mode="after")
    def _judge_pair(self) -> "EvalConfig":
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("judge_url and judge_model go together")
        return self


class Recipe(Section):
    """A whole run: the model, each stage's settings and where outputs go."""

    workdir: Path = Path("runs/default")
    stages: list[Literal["curate", "synth", "train", "merge", "eval"]] = list(STAGES)
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    curate: CurateConfig = CurateConfig()
    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()


# ---------------------------------------------------------------- loading

def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`train.max_steps=10` -> {"train": {"max_steps": 10}}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=10")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is already a value")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = path + (key_node.value,)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def format_validation_error(err: ValidationError, source: str = "recipe", lines: dict | None = None) -> str:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = source
        for n in range(len(loc), 0, -1):  # the deepest key that exists in the file
            if lines and loc[:n] in lines:
                where = f"{source}:{lines[loc[:n]]}"
                break
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe (or defaults when path is None), apply `extra` (from CLI flags) then --set overrides."""
    data: dict[str, Any] = {}
    lines: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from e
        try:
            data = yaml.safe_load(text) or {}
            lines = _yaml_lines(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: a recipe is a mapping of sections, got {type(data).__name__}")
    data = deep_merge(data, extra or {})
    data = deep_merge(data, parse_overrides(overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, lines)) from None
    recipe.curate.inputs = [bundled_data(p) for p in recipe.curate.inputs]
    recipe.eval.tasks = [_expand_task(t) for t in recipe.eval.tasks]
    return recipe


BUNDLED_DATA = "bundled:"


def bundled_data(path: str) -> str:
    """`bundled:web/fineweb-demo.parquet` -> the file shipped in ezoforge/data (works from any install)."""
    if not path.startswith(BUNDLED_DATA) or path == BUNDLED_MODEL:
        return path
    return str(Path(__file__).parent / "data" / path[len(BUNDLED_DATA):])


def _expand_task(spec: str) -> str:
    name, sep, rest = spec.partition(":")
    return f"{name}:{bundled_data(rest)}" if sep else spec


# ---------------------------------------------------------------- identity and saving

_SECRET_KEY = re.compile(r"(api_key|token|secret|password)(?!_env)", re.I)


def redact(obj: Any) -> Any:
    """Drop secret values: recipes name environment variables (`*_env`), never hold keys."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def to_plain(model: BaseModel) -> dict[str, Any]:
    return json.loads(model.model_dump_json())


def fingerprint(*parts: Any) -> str:
    """A stable hash of configs/values; changes whenever any setting that shapes the output changes."""
    blob = json.dumps([to_plain(p) if isinstance(p, BaseModel) else p for p in parts],
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two plain configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(value)"]


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(redact(to_plain(model)), allow_unicode=True, sort_keys=False)
