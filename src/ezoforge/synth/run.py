"""`ezo synth`: documents → passages → requests → (durably cached) completions → parsed, filtered pairs.

Every completion is stored in OUT/requests.sqlite the moment it arrives, keyed by everything that determines
it, so a killed run sends only the missing requests when restarted. The output shards are written from that
store at the end, in document order, then stats.json and DONE.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
from datatrove.pipeline.base import PipelineStep
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ezoforge.cache import RequestCache, request_key
from ezoforge.config import Recipe, output_settings
from ezoforge.errors import ConfigError, EzoError
from ezoforge.executors import check_shared_storage, completed, completed_ranks, executor, launch, pending_jobs
from ezoforge.infer.generate import Sampling
from ezoforge.logs import console, setup_logging
from ezoforge.records import Pair, atomic_path, write_parquet
from ezoforge.report_kit import pct, plural, rate
from ezoforge.stage import Stage, done_info, input_files
from ezoforge.synth import prompts
from ezoforge.completion import Completion
from ezoforge.infer.backends import Backend, Target
from ezoforge.infer.engines import identity as engine_identity
from ezoforge.infer.engines import pick_backend
from ezoforge.infer.registry import backend_class
from ezoforge.synth.mix import draw
from ezoforge.synth.parse import PairFilter, Parsed, parse_prompted, parse_synthesizer
from ezoforge.synth.passages import passage_budget, read_docs, split
from ezoforge.text import japanese_ratio
from ezoforge.turns import default_system

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000
PAIR_SCHEMA = pa.schema([(name, pa.string()) for name in Pair.model_fields])
REJECT_SCHEMA = pa.schema([("doc_id", pa.string()), ("passage", pa.int32()), ("reason", pa.string()),
                           ("text", pa.string()), ("output", pa.string())])


def _version(mode: str) -> str:
    return prompts.PROMPT_VERSION if mode == "prompted" else prompts.SYNTHESIZER_VERSION


def make_backend(recipe: Recipe, model: str, static_cache: bool) -> Backend:
    """The backend with its tokenizer ready (requests are sized with it); a local model loads only if needed."""
    cfg, m = recipe.synth, recipe.model
    chat = cfg.mode == "prompted"

    def load():
        from ezoforge.models import load

        return load(model, device=m.device, dtype=m.dtype, chat_template=m.chat_template, need_chat_template=chat,
                    quantize=base_quantize(recipe))

    return backend_class(cfg.backend).build(cfg, Target(model, m.chat_template, m.dtype, chat, load, cfg.tokenizer,
                                                   static_cache=static_cache))


def base_quantize(recipe: Recipe) -> str:
    """model.quantize holds for the base model; a synthesizer of its own (synth.model) fits itself (auto)."""
    return recipe.model.quantize if recipe.synth.model in (None, recipe.model.name) else "auto"


def use_static_cache(setting: str | bool, device) -> bool:
    """`synth.static_cache`: true must be honoured (CUDA graphs need CUDA), auto picks it on CUDA and says so."""
    if setting is True and device.type != "cuda":
        raise ConfigError(f"synth.static_cache is true but the compiled static-cache decode needs CUDA; the model "
                          f"runs on {device} (set synth.static_cache to auto or false)")
    if setting == "auto":
        log.info("synth.static_cache=auto: %s on %s", "on" if device.type == "cuda" else "off (CUDA only)", device)
        return device.type == "cuda"
    return setting


def build_requests(docs, backend, recipe: Recipe) -> list[prompts.Request]:
    cfg = recipe.synth
    if cfg.mode == "prompted":
        # The system message the synthesizer's chat template adds by itself (the worked example was tuned under
        # it), sent explicitly: every backend renders the prompt in-process synth renders, and no server puts its
        # own system prompt in front of it.
        system = default_system(backend.tokenizer) if backend.tokenizer is not None else ""
        make = functools.partial(prompts.prompted, n=cfg.pairs_per_doc, system=system)
    else:
        make = prompts.synthesizer
    overhead = backend.request_tokens(make("", ""))
    budget = passage_budget(cfg.max_passage_tokens, backend.context_length, overhead, cfg.generation.max_new_tokens)
    if budget < 32:
        raise ConfigError(f"synth: the prompt ({overhead} tokens) and generation.max_new_tokens "
                          f"({cfg.generation.max_new_tokens}) leave no room for a passage in "
                          f"{backend.context_length} tokens")
    return [make(d.id, p) for d in docs for p in split(d.text, budget, backend.count_tokens)]


@dataclass
class Job:
    """What every process of a synth run rebuilds the same requests from: the recipe with its backend picked, the
    curated input, the model and its identity (cache keys name it)."""

    recipe: Recipe
    input: Path
    model: str
    identity: str
    static_cache: bool
    threads: int | None = None  # a local task's share of this machine's cores (None: the engine's own setting)
    local_gpus: int = 0  # GPUs each local task takes, its own by rank (Slurm and Ray hand theirs out themselves)
    answered: frozenset[str] = frozenset()  # keys the stage's cache holds already: no task sends them again

    def documents(self) -> list:
        cfg = self.recipe.synth
        return draw(read_docs(input_files([self.input])), cfg.limit, cfg.mix, cfg.seed, str(self.input))

    def requests(self, backend, docs: list) -> tuple[list, list[str], Sampling]:
        """The requests of `docs` (this job's draw) in document order, their cache keys, and the sampling they are
        sent with."""
        cfg = self.recipe.synth
        reqs = build_requests(docs, backend, self.recipe)
        sampling = Sampling.from_config(cfg.generation, stop=prompts.stop_strings(cfg.mode, cfg.pairs_per_doc))
        settings = _answer_settings(cfg)
        keys = [request_key(model=self.identity, url=cfg.base_url, backend=cfg.backend, mode=cfg.mode,
                            version=_version(cfg.mode), messages=r.messages, prefill=r.prefill, prompt=r.prompt,
                            sampling=asdict(sampling), **settings) for r in reqs]
        return reqs, keys, sampling


def run(recipe: Recipe, input: Path, out: Path, force: bool = False, allow_empty: bool = False) -> dict:
    model = recipe.synth.model or recipe.model.name
    m = recipe.model
    cfg = pick_backend(recipe.synth, "synth.backend", model, None, m.device, base_quantize(recipe))
    recipe = recipe.model_copy(update={"synth": cfg})
    files = input_files([input])
    if backend_class(cfg.backend).served:  # a served name: base_url (in the output settings) says which model
        identity, static_cache = model, False
    else:  # a local model must exist before work starts, and is known by its weights
        from ezoforge.models import check_model, model_identity, pick_device

        device = None if backend_class(cfg.backend).own_device else m.device  # vLLM: CUDA is the engine's alone
        check_model(model, None, device, m.chat_template, base_quantize(recipe))
        identity = engine_identity(cfg.backend, model_identity(model, None, m.dtype, device, m.chat_template,
                                                               base_quantize(recipe)))
        static_cache = cfg.backend == "transformers" and use_static_cache(cfg.static_cache, pick_device(m.device))
    sharded = cfg.workers > 1 or cfg.executor.kind != "local"
    local = sharded and cfg.executor.kind == "local"
    job = Job(recipe, Path(input), model, identity, static_cache, _threads_per_task(cfg) if sharded else None,
              cfg.executor.gpus_per_task if local else 0)
    # The draw comes first: a mix naming an absent source fails before the output folder is claimed.
    docs = job.documents()
    if not docs:
        raise EzoError(f"{input}: no documents with text")
    check_shared_storage(out, cfg.executor, "synth.executor.kind")
    stage = Stage("synth", out, {"synth": output_settings(cfg), "version": _version(cfg.mode)},
                  model={"name": model, "identity": identity, "dtype": m.dtype, "chat_template": m.chat_template},
                  inputs=[input])
    # Answers are keyed by all that determines them: a forced redo (say, with a larger limit) reuses them.
    if (finished := stage.start(force, keep=("requests.sqlite", TASKS))) is not None:
        if not finished.get("errors"):
            return finished
        # Finished with failed requests (within max_error_fraction): this run sends those again.
        log.info("%s: retrying the %d request(s) that failed last time", out, finished["errors"])
        stage.reopen()
    with stage.claimed():
        backend = make_backend(recipe, model, static_cache)
        reqs, keys, sampling = job.requests(backend, docs)
        cache = RequestCache(Path(out) / "requests.sqlite")
        try:
            if not sharded:
                sent = _generate(backend, reqs, keys, cache, sampling)
            else:
                backend.close()  # here only to count tokens: the tasks load their own engines
                sent = _sharded(job, stage, keys, cache)
            return _write(stage, recipe, model, docs, reqs, keys, cache, sent, allow_empty)
        finally:
            cache.close()
            backend.close()  # a vLLM engine holds most of the card until shut down


# ---------------------------------------------------------------- on an executor: a slice of the requests per task

TASKS = "tasks"  # the tasks' request caches and answers, and datatrove's logs and completion markers


def _threads_per_task(cfg) -> int | None:
    """Local tasks share this machine's cores: each takes cores / workers threads (llama.cpp's and torch's), unless
    OMP_NUM_THREADS says otherwise. Tasks on other machines (Slurm, Ray) keep their engines' own settings."""
    if cfg.executor.kind != "local" or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    log.info("synth.workers=%d on this machine: %d thread(s) per task (%d cores)", cfg.workers, threads,
             os.cpu_count() or 1)
    return threads


class SynthSlice(PipelineStep):
    """One task of a sharded synth: the requests i with i % tasks == rank, answered with the configured backend into
    a request cache of its own (SQLite stays on one node), then its answers written as one file, atomically."""

    name = "synth slice"
    type = "🤖 - SYNTH"

    def __init__(self, job: Job, folder: Path):
        super().__init__()
        self.job, self.folder = job, Path(folder)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if not logging.getLogger().handlers:  # a process of the executor's own: its progress lines go to stderr
            setup_logging(logging.INFO)
        if self.job.local_gpus:  # task r takes cards r*g … r*g+g-1 of this machine (before CUDA starts here)
            g = self.job.local_gpus
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(rank * g + i) for i in range(g))
        if self.job.threads:
            import torch

            os.environ["OMP_NUM_THREADS"] = str(self.job.threads)  # llama.cpp's `auto` reads it
            torch.set_num_threads(self.job.threads)
        backend = make_backend(self.job.recipe, self.job.model, self.job.static_cache)
        cache = RequestCache(self.folder / f"requests-{rank:05d}.sqlite")
        try:
            reqs, keys, sampling = self.job.requests(backend, self.job.documents())
            mine = [i for i in range(rank, len(reqs), world_size) if keys[i] not in self.job.answered]
            sent = _generate(backend, [reqs[i] for i in mine], [keys[i] for i in mine], cache, sampling,
                             task=f"task {rank + 1}/{world_size}")
            answers = [{"key": keys[i], "output": cache.get(keys[i])} for i in mine if cache.get(keys[i]) is not None]
            (self.folder / f"answers-{rank:05d}.counted").unlink(missing_ok=True)  # new answers, not yet counted
            with atomic_path(self.folder / f"answers-{rank:05d}.json") as tmp:
                tmp.write_text(json.dumps({"answers": answers, "requests": sent["requests"],
                                           "tokens_out": sent["tokens_out"],
                                           "errors": {str(mine[j]): e for j, e in sent["errors"].items()}},
                                          ensure_ascii=False), encoding="utf-8")
        finally:
            cache.close()
            backend.close()
        return
        yield  # a datatrove step is a generator; this one only writes


def _sharded(job: Job, stage: Stage, keys: list[str], cache: RequestCache) -> dict:
    """Run the slices on synth.executor (a finished task is skipped, an unfinished one resumes from its cache), then
    gather their answers into the stage's cache. With Slurm the tasks are submitted and the stage is held until the
    same command, run again, finds them finished."""
    cfg = job.recipe.synth
    folder = stage.out / TASKS
    logs = folder / "logs"
    sent = {"requests": 0, "tokens_out": 0, "seconds": 0.0, "errors": {}}
    before = completed_ranks(logs)  # finished in an earlier command (a killed run's, Slurm's): joined as they are
    _gather(folder, before, set(keys), cache, sent)
    answered = frozenset(k for k in keys if cache.get(k) is not None)
    if len(answered) == len(keys):
        return sent
    if len(before) >= cfg.workers:  # every task finished, yet answers are missing (failed requests, a changed
        shutil.rmtree(logs / "completions")  # worker count): the tasks run again and send only those
        before = set()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ex = executor(cfg.executor, "synth.executor.kind", [SynthSlice(replace(job, answered=answered), folder)],
                  cfg.workers, cfg.workers, logs, "synth")
    launch(ex, cfg.executor, "synth.executor.kind")
    if completed(logs) < cfg.workers:
        jobs = ", ".join(pending_jobs([ex]))
        stage.hold(f"Slurm jobs {jobs}")
        raise EzoError(f"submitted the synth tasks to Slurm as jobs {jobs} (logs in {logs}); run the same command "
                       "again once they have finished to gather their pairs and write DONE")
    sent["seconds"] = time.perf_counter() - start
    _gather(folder, set(range(cfg.workers)) - before, set(keys), cache, sent)
    return sent


def _gather(folder: Path, ranks: set[int], wanted: set[str], cache: RequestCache, sent: dict) -> None:
    """The answers of the tasks `ranks` into the stage's cache and their failures into `sent`; what a task sent counts
    once, for the command that first gathers its answers (a `.counted` marker beside them says it has)."""
    for rank in sorted(ranks):
        path = folder / f"answers-{rank:05d}.json"
        if not path.is_file():
            continue
        shard = json.loads(path.read_text(encoding="utf-8"))
        for answer in shard["answers"]:
            if answer["key"] in wanted:
                cache.put(answer["key"], answer["output"])
        sent["errors"].update({int(i): e for i, e in shard["errors"].items()})
        counted = path.with_suffix(".counted")
        if not counted.exists():
            sent["requests"] += shard["requests"]
            sent["tokens_out"] += shard["tokens_out"]
            counted.touch()


def _answer_settings(cfg) -> dict:
    """The backend's answer-changing settings where they differ from the defaults: the keys made before a setting
    existed stay valid (an unquantized vLLM engine's keys are those of the model)."""
    kind = backend_class(cfg.backend)
    default = kind.answer_settings(type(cfg)())
    return {k: v for k, v in kind.answer_settings(cfg).items() if default.get(k) != v}


def _generate(backend, reqs, keys, cache: RequestCache, sampling: Sampling, task: str | None = None) -> dict:
    """Send the requests the cache lacks; return this run's counts and the errors by request index. A `task` of a
    sharded run reports its progress as log lines (several tasks share a console), else a rich bar."""
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    sent = {"requests": len(todo), "tokens_out": 0, "seconds": 0.0, "errors": {}}
    if not todo:
        return sent
    start = time.perf_counter()
    with _progress(task, len(reqs), len(reqs) - len(todo)) as advance:

        def done(j: int, result: Completion | Exception) -> None:
            i = todo[j]
            if isinstance(result, Exception):
                sent["errors"][i] = str(result)
                log.warning("request for document %s failed: %s", reqs[i].doc_id, result)
            else:
                cache.put(keys[i], asdict(result))
                sent["tokens_out"] += result.completion_tokens
            advance(sent["tokens_out"] / max(time.perf_counter() - start, 1e-9))

        backend.run([reqs[i] for i in todo], sampling, done)
    sent["seconds"] = time.perf_counter() - start
    return sent


@contextlib.contextmanager
def _progress(task: str | None, total: int, completed: int):
    """`advance(tokens_per_s)` once per answered request: a rich bar, or for a task a log line every tenth."""
    if task is None:
        columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[rate]}"))
        with Progress(*columns, transient=False, console=console) as progress:
            bar = progress.add_task("synth", total=total, completed=completed, rate="")
            yield lambda rate: progress.update(bar, advance=1, rate=f"{rate:.0f} tok/s")
        return
    count = [completed]

    def advance(rate: float) -> None:
        count[0] += 1
        if count[0] == total or count[0] % max(total // 10, 1) == 0:
            log.info("synth %s: %d of %d requests answered, %.0f tok/s", task, count[0], total, rate)
    yield advance


def _parse(mode: str, output: Completion, n: int) -> Parsed:
    if mode == "synthesizer":
        return parse_synthesizer(output.text)
    return parse_prompted(output.text, n, truncated=output.finish_reason == "length")


def _write(stage: Stage, recipe: Recipe, model: str, docs, reqs, keys, cache: RequestCache, sent: dict,
           allow_empty: bool) -> dict:
    cfg = recipe.synth
    generator = f"{model}|{cfg.mode}|{_version(cfg.mode)}"
    pairs, rejected = [], []
    tokens_in = tokens_out = 0
    parsed_docs: set[str] = set()  # an output that parsed into at least one pair
    with_pairs: set[str] = set()  # at least one pair kept by the filters
    filt = PairFilter(cfg.filters)
    passage_no: dict[str, int] = {}
    source = {d.id: d.source for d in docs}  # drawn document → its source
    for i, (req, key) in enumerate(zip(reqs, keys)):
        if req.doc_id not in passage_no:
            filt.new_document()
        p = passage_no[req.doc_id] = passage_no.get(req.doc_id, -1) + 1
        stored = cache.get(key)
        if stored is None:
            rejected.append({"doc_id": req.doc_id, "passage": p, "reason": "request_error",
                             "text": sent["errors"].get(i, "not sent"), "output": ""})
            continue
        output = Completion(**stored)
        tokens_in += output.prompt_tokens
        tokens_out += output.completion_tokens
        parsed = _parse(cfg.mode, output, cfg.pairs_per_doc)
        if parsed.pairs:
            parsed_docs.add(req.doc_id)
        for reason, piece in parsed.dropped:
            rejected.append({"doc_id": req.doc_id, "passage": p, "reason": reason, "text": piece,
                             "output": output.text})
        for k, (instruction, response) in enumerate(parsed.pairs):
            reason = filt.check(instruction, response, req.passage)
            if reason:
                rejected.append({"doc_id": req.doc_id, "passage": p, "reason": reason,
                                 "text": f"{instruction}\n{response}", "output": output.text})
                continue
            with_pairs.add(req.doc_id)
            pairs.append(Pair(id=f"{req.doc_id}/{p}/{k}", doc_id=req.doc_id, instruction=instruction,
                              response=response, context=req.passage, generator=generator,
                              source=source[req.doc_id]).model_dump())
    # Every request without a stored answer failed, in this run or (not resent, say after a kill) before it.
    failed = [i for i, k in enumerate(keys) if cache.get(k) is None]
    failures = _error_reasons([sent["errors"].get(i, "not sent") for i in failed])
    if len(failed) > cfg.max_error_fraction * len(reqs):
        raise EzoError(f"synth: {len(failed)} of {len(reqs)} requests failed ({_said(failures)}); rerun the same "
                       f"command to retry only those (max_error_fraction {cfg.max_error_fraction})")
    if failed:
        log.warning("synth: %d of %d requests failed (%s); the output holds the rest — rerun the same command to "
                    "retry only those", len(failed), len(reqs), _said(failures))
    if not pairs and not allow_empty:  # no DONE; the stored answers stay for a rerun
        japanese = sum(japanese_ratio(d.text) >= cfg.filters.min_japanese for d in docs)
        why = Counter(row["reason"] for row in rejected).most_common(3)
        raise EzoError(f"synth: 0 pairs from {len(docs)} documents ({japanese} of {len(docs)} documents are Japanese; "
                       f"dropped: {', '.join(f'{r} {n}' for r, n in why) or 'nothing parsed'}); nothing for train to "
                       "learn — check the input and the model, or pass --allow-empty")
    _shards(stage.out / "data", pairs, PAIR_SCHEMA)
    _shards(stage.out / "rejected", rejected, REJECT_SCHEMA)
    reasons: dict[str, int] = {}
    for row in rejected:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return stage.finish({
        "documents": len(docs), "requests": len(reqs), "requests_sent": sent["requests"], "errors": len(failed),
        "error_reasons": failures,
        "parse_rate": round(len(parsed_docs) / len(docs), 4), "documents_with_pairs": len(with_pairs),
        "pairs": len(pairs), "pairs_per_doc": round(len(pairs) / len(docs), 4),
        "rejected": len(rejected), "rejected_by_reason": dict(sorted(reasons.items())),
        "tokens_in": tokens_in, "tokens_out": tokens_out,
        "tokens_per_s": round(sent["tokens_out"] / sent["seconds"], 1) if sent["seconds"] else None,
        "generator": generator,
        **_by_source(source, reqs, with_pairs, pairs),
    })


def _error_reasons(errors: list[str]) -> dict[str, int]:
    """Failures counted by their message's first line (a status and reason, an exception type)."""
    counts: dict[str, int] = {}
    for e in errors:
        first = (e.strip().splitlines() or ["unknown"])[0][:200]
        counts[first] = counts.get(first, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _said(reasons: dict[str, int]) -> str:
    return "; ".join(f"{n}× {r}" for r, n in list(reasons.items())[:3])


def _by_source(source: dict[str, str], reqs, with_pairs: set[str], pairs: list[dict]) -> dict:
    """The mix as drawn: per source, documents, passages, documents with a kept pair, and pairs."""
    by = {s: {"documents": 0, "passages": 0, "documents_with_pairs": 0, "pairs": 0} for s in sorted(source.values())}
    for s in source.values():
        by[s]["documents"] += 1
    for r in reqs:
        by[source[r.doc_id]]["passages"] += 1
    for doc_id in with_pairs:
        by[source[doc_id]]["documents_with_pairs"] += 1
    for p in pairs:
        by[p["source"]]["pairs"] += 1
    return {"by_source": by, "mix": {s: round(v["documents"] / len(source), 4) for s, v in by.items()}}


def _shards(folder: Path, rows: list[dict], schema: pa.Schema) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, max(len(rows), 1), SHARD_ROWS)):
        write_parquet(folder / f"part-{n:05d}.parquet", rows[start: start + SHARD_ROWS], schema)


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo synth` prints and the run report shows."""
    s = done_info(folder).stats
    return (f"{plural(s.get('pairs'), 'pair')} from {s.get('documents_with_pairs')} of "
            f"{plural(s.get('documents'), 'document')} ({plural(s.get('requests'), 'request')}, parse rate "
            f"{pct(s.get('parse_rate'))}, {s.get('errors', 0)} failed), {rate(s.get('tokens_per_s'))}")
