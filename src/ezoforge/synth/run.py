"""`ezo synth`: documents → passages → requests → (durably cached) completions → parsed, filtered pairs.

Every completion is stored in OUT/requests.sqlite the moment it arrives, keyed by everything that determines
it, so a killed run sends only the missing requests when restarted. The output shards are written from that
store at the end, in document order, then stats.json and DONE.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ezoforge.cache import RequestCache, request_key
from ezoforge.config import Recipe, output_settings
from ezoforge.errors import ConfigError, EzoError
from ezoforge.infer.generate import Sampling
from ezoforge.records import Pair, write_parquet
from ezoforge.stage import Stage, input_files
from ezoforge.synth import prompts
from ezoforge.infer.backends import Backend, Output, Target
from ezoforge.infer.engines import identity as engine_identity
from ezoforge.infer.engines import pick_backend
from ezoforge.infer.registry import BACKENDS
from ezoforge.synth.mix import draw
from ezoforge.synth.parse import PairFilter, Parsed, parse_prompted, parse_synthesizer
from ezoforge.synth.passages import read_docs, split
from ezoforge.text import japanese_ratio
from ezoforge.turns import default_system

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000
# Tokens kept free beyond prompt + passage + new tokens: sentence-wise counts can differ slightly from the whole.
MARGIN = 16
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

    return BACKENDS[cfg.backend].build(cfg, Target(model, m.chat_template, m.dtype, chat, load, cfg.tokenizer,
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
    budget = min(cfg.max_passage_tokens, backend.context_length - overhead - cfg.generation.max_new_tokens - MARGIN)
    if budget < 32:
        raise ConfigError(f"synth: the prompt ({overhead} tokens) and generation.max_new_tokens "
                          f"({cfg.generation.max_new_tokens}) leave no room for a passage in "
                          f"{backend.context_length} tokens")
    return [make(d.id, p) for d in docs for p in split(d.text, budget, backend.count_tokens)]


def run(recipe: Recipe, input: Path, out: Path, force: bool = False, allow_empty: bool = False) -> dict:
    model = recipe.synth.model or recipe.model.name
    m = recipe.model
    cfg = pick_backend(recipe.synth, "synth.backend", model, None, m.device, base_quantize(recipe))
    recipe = recipe.model_copy(update={"synth": cfg})
    files = input_files([input])
    if BACKENDS[cfg.backend].served:  # a served name: base_url (in the output settings) says which model
        identity, static_cache = model, False
    else:  # a local model must exist before work starts, and is known by its weights
        from ezoforge.models import check_model, model_identity, pick_device

        device = None if BACKENDS[cfg.backend].own_device else m.device  # vLLM: CUDA is the engine's alone
        check_model(model, None, device, m.chat_template, base_quantize(recipe))
        identity = engine_identity(cfg.backend, model_identity(model, None, m.dtype, device, m.chat_template,
                                                               base_quantize(recipe)))
        static_cache = cfg.backend == "transformers" and use_static_cache(cfg.static_cache, pick_device(m.device))
    # The draw comes first: a mix naming an absent source fails before the output folder is claimed.
    docs = draw(read_docs(files), cfg.limit, cfg.mix, cfg.seed, str(input))
    if not docs:
        raise EzoError(f"{input}: no documents with text")
    stage = Stage("synth", out, {"synth": output_settings(cfg), "version": _version(cfg.mode)},
                  model={"name": model, "identity": identity, "dtype": m.dtype, "chat_template": m.chat_template},
                  inputs=[input])
    # Answers are keyed by all that determines them: a forced redo (say, with a larger limit) reuses them.
    if (finished := stage.start(force, keep=("requests.sqlite",))) is not None:
        if not finished.get("errors"):
            return finished
        # Finished with failed requests (within max_error_fraction): this run sends those again.
        log.info("%s: retrying the %d request(s) that failed last time", out, finished["errors"])
        stage.reopen()
    with stage.claimed():
        backend = make_backend(recipe, model, static_cache)
        reqs = build_requests(docs, backend, recipe)
        sampling = Sampling.from_config(cfg.generation, stop=prompts.stop_strings(cfg.mode, cfg.pairs_per_doc))
        settings = _answer_settings(cfg)
        keys = [request_key(model=identity, url=cfg.base_url, backend=cfg.backend, mode=cfg.mode,
                            version=_version(cfg.mode), messages=r.messages, prefill=r.prefill, prompt=r.prompt,
                            sampling=asdict(sampling), **settings) for r in reqs]
        cache = RequestCache(Path(out) / "requests.sqlite")
        try:
            sent = _generate(backend, reqs, keys, cache, sampling)
            return _write(stage, recipe, model, docs, reqs, keys, cache, sent, allow_empty)
        finally:
            cache.close()
            backend.close()  # a vLLM engine holds most of the card until shut down


def _answer_settings(cfg) -> dict:
    """The backend's answer-changing settings where they differ from the defaults: the keys made before a setting
    existed stay valid (an unquantized vLLM engine's keys are those of the model)."""
    kind = BACKENDS[cfg.backend]
    default = kind.answer_settings(type(cfg)())
    return {k: v for k, v in kind.answer_settings(cfg).items() if default.get(k) != v}


def _generate(backend, reqs, keys, cache: RequestCache, sampling: Sampling) -> dict:
    """Send the requests the cache lacks; return this run's counts and the errors by request index."""
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    sent = {"requests": len(todo), "tokens_out": 0, "seconds": 0.0, "errors": {}}
    if not todo:
        return sent
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rate]}"))
    start = time.perf_counter()
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("synth", total=len(reqs), completed=len(reqs) - len(todo), rate="")

        def done(j: int, result: Output | Exception) -> None:
            i = todo[j]
            if isinstance(result, Exception):
                sent["errors"][i] = str(result)
                log.warning("request for document %s failed: %s", reqs[i].doc_id, result)
            else:
                cache.put(keys[i], asdict(result))
                sent["tokens_out"] += result.tokens_out
            rate = sent["tokens_out"] / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:.0f} tok/s")

        backend.run([reqs[i] for i in todo], sampling, done)
    sent["seconds"] = time.perf_counter() - start
    return sent


def _parse(mode: str, output: Output, n: int) -> Parsed:
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
        output = Output(**stored)
        tokens_in += output.tokens_in
        tokens_out += output.tokens_out
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
