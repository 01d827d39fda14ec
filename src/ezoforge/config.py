"""Recipe configuration: one pydantic model per stage, YAML + dotted overrides, fingerprints.

Every model forbids unknown keys so a typo fails before any work, naming the key path
(and the YAML line when the recipe came from a file).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ezoforge.errors import ConfigError

# The seed model card's own system prompt (Llama-3.1-70B-EZO-1.1-it).
DEFAULT_SYSTEM_PROMPT = "あなたは誠実で優秀な日本人のアシスタントです。特に指示が無い場合は、原則日本語で回答してください。"
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
STAGES = ("curate", "synth", "train", "merge", "eval")


OPERATIONAL = "operational"
T = TypeVar("T")
# A setting that changes how a stage runs, not what it writes (how often to log or save, workers, concurrency,
# timeouts, retries, inference batch sizes): left out of the folder's fingerprint (`output_settings`), so changing
# one never invalidates a folder and a resumed run simply picks up the new value. Marked on the field, where it is
# declared: `save_every: Operational[int] = 50`.
Operational = Annotated[T, OPERATIONAL]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    operational: ClassVar[frozenset[str]] = frozenset()  # the names of its Operational fields

    def check_recipe(self, recipe: "Recipe") -> None:
        """A stage's section refuses, with a ValueError, a recipe that runs the stage but lacks what it needs from
        other sections (prefer's judge, say)."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.operational = frozenset(name for name, field in cls.model_fields.items() if OPERATIONAL in field.metadata)


class BackendSettings(Section):
    """A backend's own subsection (`vllm`, `llamacpp`): its settings apply under that backend only."""

    backend: ClassVar[str]
    auto_picks: ClassVar[bool] = False  # whether a backend `auto` may pick it (its settings then stand)

    def refuse_unless(self, backend: str) -> None:
        """A stated setting under another backend would be ignored: refuse it."""
        default = type(self)()
        changed = [k for k in type(self).model_fields if getattr(self, k) != getattr(default, k)]
        if backend != self.backend and not (backend == "auto" and self.auto_picks) and changed:
            raise ValueError(f"{self.backend}.{changed[0]} is a {self.backend}-backend setting; backend '{backend}' "
                             "would ignore it")


class LlamaCppConfig(BackendSettings):
    """llama.cpp on the CPU (a `backend: llamacpp`, llama-cpp-python): one context decodes several sequences together
    (synth and eval: generation.batch_size; `ezo serve`: serve.max_batch), each with `kv_tokens` of KV cache."""

    backend = "llamacpp"
    auto_picks = True
    # All operational: how fast answers are computed. Like generation.batch_size, they change a reply only through
    # float rounding.
    # llama.cpp's threads spin while they wait: more threads than free cores is much slower, not a little.
    # auto: OMP_NUM_THREADS where set, else os.cpu_count() (logged)
    threads: Operational[Literal["auto"] | Annotated[int, Field(ge=1)]] = "auto"
    kv_tokens: Operational[int] = Field(4096, ge=256)  # KV cache of each sequence: its prompt and new tokens at most
    # tokens per decode call (n_batch): prompt chunks and one per sequence
    batch_tokens: Operational[int] = Field(512, ge=32)


class ModelConfig(Section):
    """The base model every stage starts from."""

    name: str = BUNDLED_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    chat_template: Path | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    # quantize and backend (operational) change answers, but every cached answer is keyed by the model's identity and
    # the engine actually used; a stage that never loads the model this way (train) is not invalidated by them.
    # Weights of generate, chat, serve and eval's answers: bitsandbytes int8 or nf4 (double-quantized), or none;
    # auto: nf4 only where the weights at the load dtype do not fit the device (logged). Training has its own
    # setting (train.qlora).
    quantize: Operational[Literal["auto", "none", "nf4", "int8"]] = "auto"
    # What generate, chat and serve answer with: transformers, or llama.cpp (`llamacpp` settings: a whole model on the
    # CPU, its own GGUF or an f16 GGUF our exporter writes once). auto: llamacpp on a CPU where llama-cpp-python is
    # installed and the model needs no adapter or bitsandbytes, else transformers (logged).
    backend: Operational[Literal["auto", "transformers", "llamacpp"]] = "auto"
    llamacpp: Operational[LlamaCppConfig] = LlamaCppConfig()

    @model_validator(mode="after")
    def _engine_settings(self) -> "ModelConfig":
        self.llamacpp.refuse_unless(self.backend)
        return self


class GenerationConfig(Section):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    batch_size: Operational[int] = Field(8, ge=1)
    seed: int = 0



class ExecutorConfig(Section):
    """Which datatrove executor runs the passes: local processes, Slurm job arrays, or a Ray cluster."""

    kind: Literal["local", "slurm", "ray"] = "local"
    partition: str | None = None  # slurm
    time: str = "24:00:00"  # slurm time limit per task
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    gpus_per_task: int = Field(0, ge=0)  # GPUs each task is given (Slurm gres, Ray num_gpus): synth's vLLM engines
    venv_path: str | None = None  # slurm: venv to activate on the nodes
    job_name: str = "ezo-curate"
    sbatch_args: dict[str, str] = {}

    @model_validator(mode="after")
    def _slurm_partition(self) -> "ExecutorConfig":
        if self.kind == "slurm" and not self.partition:
            raise ValueError("executor 'slurm' needs partition")
        return self


# What synth and eval answer through, by the name `synth.backend` and `eval.backend` take: each backend's class as
# "module:Class", imported only where a stage builds it or `ezo plan` asks for its estimate
# (`infer.registry.backend_class`). A new backend is its module and its line here (a backend's own settings, if it
# has any, go in both sections as a subsection like `vllm`).
BACKENDS = {
    "transformers": "ezoforge.infer.backends:TransformersBackend",
    "vllm": "ezoforge.infer.backends:VLLMBackend",
    "openai": "ezoforge.infer.backends:OpenAIBackend",
    "llamacpp": "ezoforge.infer.llamacpp:LlamaCppBackend",
}


def _known_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: one of auto, {', '.join(BACKENDS)}")
    return name


# auto: llamacpp where llama.cpp can run the model on this CPU, else transformers (`infer.engines.pick_backend`, logged).
BackendChoice = Annotated[str, AfterValidator(_known_backend)]


class VLLMConfig(BackendSettings):
    """A vLLM engine (`synth.backend` or `eval.backend: vllm`). It claims `gpu_memory_utilization` of each card for
    the weights, its activations and the KV cache; what the weights leave must hold at least one context of KV cache
    (the section's `context_tokens`, vLLM's max_model_len). Quantization changes the answers; the rest changes only
    where and how fast they are computed (operational)."""

    tensor_parallel_size: Operational[int] = Field(1, ge=1)  # cards the weights are split over
    # none: the checkpoint's own dtype (an AWQ/GPTQ checkpoint declares itself); fp8: weights quantized to FP8 on
    # load (Hopper/Ada cards); bitsandbytes: 4-bit on load; awq/gptq: the checkpoint must be quantized so.
    quantization: Literal["none", "fp8", "bitsandbytes", "awq", "gptq"] = "none"
    gpu_memory_utilization: Operational[float] = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    max_num_seqs: Operational[int] = Field(256, ge=1)  # sequences decoded together (when the KV cache holds them)
    enforce_eager: Operational[bool] = False  # no CUDA graphs: less memory, slower decoding

    backend = "vllm"


def default_temperature_only(model: str) -> bool:
    """OpenAI's reasoning models (the o-series, the gpt-5 family but its chat models): they take
    `max_completion_tokens`, not `max_tokens`, and refuse a temperature (or top_p) other than the default, 1."""
    name = model.rsplit("/", 1)[-1].lower()
    return re.match(r"(o\d|gpt-5)", name) is not None and not name.startswith("gpt-5-chat")


# ---------------------------------------------------------------- serve (`ezo serve` limits; all operational)

class ServeConfig(Section):
    max_batch: Operational[int] = Field(16, ge=1)  # requests decoded together; more wait in the queue
    # requests waiting for a place; one more gets 429 with Retry-After
    max_queue: Operational[int] = Field(64, ge=0)
    max_body_bytes: Operational[int] = Field(1 << 20, ge=1024)  # a larger request body gets 413
    request_timeout: Operational[float] = Field(600.0, gt=0, allow_inf_nan=False)  # seconds from arrival to last token
    # Prompt tokens (padded) prefilled in one forward pass when requests join: one pass over 14 judge prompts of
    # ~1,400 tokens was slower on a CPU than one pass each (bench/judge_bench.py); short prompts still share one.
    max_prefill_tokens: Operational[int] = Field(2048, ge=1)



class Recipe(Section):
    """A whole run's own keys: where outputs go, the stages it runs, the model and the shared generation and serve
    settings. Each stage's section is its step's (`stages.Step.settings`): the whole recipe is `stages.Recipe`,
    this class with those sections, and `stages.load_recipe` reads one."""

    workdir: Path = Path("runs/default")
    # export, prefer and reinforce (between train and merge): opt-in
    stages: list[str] = list(STAGES)
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    serve: ServeConfig = ServeConfig()

    stage_names: ClassVar[tuple[str, ...]] = ()  # the stages whose sections the recipe holds, in run order

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        for name in stages:
            if name not in cls.stage_names:
                raise ValueError(f"unknown stage {name!r}: one of {', '.join(cls.stage_names)}")
        return stages

    @model_validator(mode="after")
    def _sections_agree(self) -> "Recipe":
        # Checked here, so `ezo run` fails before curating and training, not at the stage that needs it.
        for name in self.stages:
            getattr(self, name).check_recipe(self)
        return self


# ---------------------------------------------------------------- loading

def _dotted(key: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`train.max_steps=10` -> {"train": {"max_steps": 10}}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        try:
            tree = deep_merge(tree, _dotted(key.strip(), value), strict=True)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {key.strip()} clashes with another --set") from None
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, strict)
        elif strict and key in out and (isinstance(value, dict) or isinstance(out[key], dict)):
            raise ValueError(key)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}:{line}: duplicate key '{key}' (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


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


def _paths(tree: dict[str, Any], prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out += _paths(value, prefix + (key,)) if isinstance(value, dict) and value else [prefix + (key,)]
    return out


def format_validation_error(err: ValidationError, source: str = "recipe", lines: dict | None = None,
                            origins: dict[tuple, str] | None = None) -> str:
    """One line per problem, each naming where the value came from: `--set KEY=VALUE`, a flag, or FILE:LINE."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = source
        for n in range(len(loc), 0, -1):  # the deepest key given on the command line, else in the file
            if origins and loc[:n] in origins:
                where = origins[loc[:n]]
                break
            if lines and loc[:n] in lines:
                where = f"{source}:{lines[loc[:n]]}"
                break
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def parse_recipe(model: type[Recipe], path: str | Path | None = None, overrides: list[str] | None = None,
                 extra: dict[str, Any] | None = None, flag_names: dict[str, str] | None = None) -> Recipe:
    """Load a recipe as `model` (or its defaults when path is None), apply `extra` (from CLI flags, dotted key ->
    value; named in errors by `flag_names`) then --set overrides. `stages.load_recipe` calls it with the whole
    recipe."""
    data: dict[str, Any] = {}
    lines: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a recipe file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8) recipe file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from e
        try:
            loader = _UniqueKeyLoader(text)
            loader.name = str(path)
            try:
                data = loader.get_single_data() or {}
            finally:
                loader.dispose()
            lines = _yaml_lines(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: a recipe is a mapping of sections, got {type(data).__name__}")
    origins: dict[tuple, str] = {}
    flags: dict[str, Any] = {}
    for dotted, value in (extra or {}).items():
        if value is not None:
            flags = deep_merge(flags, _dotted(dotted, value))
            name = (flag_names or {}).get(dotted, "--" + dotted.rsplit(".", 1)[-1].replace("_", "-"))
            origins[tuple(dotted.split("."))] = f"flag {name}"
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        origins[tuple(key.split("."))] = f"--set {item}"
    data = deep_merge(deep_merge(data, flags), parse_overrides(overrides))
    for loc in _paths(parse_overrides(overrides)):  # a typo'd section named by the --set that made it
        for n in range(1, len(loc)):
            origins.setdefault(loc[:n], origins.get(loc, ""))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, lines, origins)) from None


BUNDLED_DATA = "bundled:"


def imported(ref: str) -> Any:
    """What a "module:name" reference names, imported on first use: a registry line (a backend, a step's estimate)
    names its class or function without importing it."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def bundled_data(path: str) -> str:
    """`bundled:web/fineweb-demo.parquet` -> the file shipped in ezoforge/data (works from any install)."""
    if not path.startswith(BUNDLED_DATA) or path == BUNDLED_MODEL:
        return path
    return str(Path(__file__).parent / "data" / path[len(BUNDLED_DATA):])


def bundled_task(spec: str) -> str:
    """An eval task spec with its file's `bundled:` path resolved (`elyza100:bundled:tasks/x.jsonl`)."""
    name, sep, rest = spec.partition(":")
    return f"{name}:{bundled_data(rest)}" if sep else spec


# ---------------------------------------------------------------- identity and saving

# Whole key names only: `hf_token` is a secret, `max_new_tokens` is not.
_SECRET_KEY = re.compile(r"(^|_)(api_key|token|secret|password)$", re.I)


def redact(obj: Any) -> Any:
    """Drop secret values: recipes name environment variables (`*_env`), never hold keys."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def secret(var: str, what: str) -> str:
    """A key or token, read only from the environment variable a recipe or flag names, so it is never in a recipe,
    a saved config or a log; unset or empty is an error that names `what` asked for it."""
    value = os.environ.get(var, "")
    if not value:
        raise ConfigError(f"{what}: environment variable {var} is not set or empty")
    return value


def to_plain(model: BaseModel) -> dict[str, Any]:
    return json.loads(model.model_dump_json())


def output_settings(section: Section) -> dict[str, Any]:
    """The section's plain values without its (and its subsections') operational keys: what shapes the output."""
    plain = to_plain(section)
    return {name: output_settings(value) if isinstance(value := getattr(section, name), Section) else plain[name]
            for name in type(section).model_fields if name not in section.operational}


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
