"""`ezo synth` end to end: the bundled model (transformers), `ezo serve` (openai backend), a scripted server for
retries and failures, and a killed run that resumes without sending any finished request again."""
import asyncio
import importlib.util
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import closing
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ezoforge.config import bundled_data
from ezoforge.errors import ConfigError
from ezoforge.infer.generate import Sampling
from ezoforge.infer.serve import BackgroundServer
from ezoforge.records import Pair, read_rows, write_parquet
from ezoforge.remote import RemoteError, chat, make_client
from ezoforge.stage import Stage
from ezoforge.stages import load_recipe
from ezoforge.synth import prompts
from ezoforge.synth.mix import draw
from ezoforge.synth.passages import read_docs, split
from ezoforge.synth.run import run

BUNDLED = "bundled:smollm2-135m-instruct"


def paragraphs(tmp_path, n):
    """The first n of the package's encyclopedic paragraphs (300-340 tokens each), as documents known by line."""
    rows = Path(bundled_data("bundled:heldout/heldout-ja.jsonl")).read_text(encoding="utf-8").splitlines()[:n]
    texts = [json.loads(x)["text"] for x in rows]
    path = tmp_path / "paragraphs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path, texts


def pairs_of(out):
    return [row for f in sorted((out / "data").glob("*.parquet")) for _, row in read_rows(f)]


# ---------------------------------------------------------------- transformers backend, bundled model

def test_bundled_model_end_to_end(bundled, tmp_path):
    docs, texts = paragraphs(tmp_path, 1)
    # Greedy decoding makes the outcome fixed: at 64 tokens the 135M model keeps a pair from these passages.
    recipe = load_recipe(None, ["synth.generation.max_new_tokens=64", "synth.pairs_per_doc=1",
                                "synth.max_passage_tokens=160"])
    out = tmp_path / "synth"
    stats = run(recipe, docs, out)

    assert (out / "DONE").exists() and json.loads((out / "stats.json").read_text())["pairs"] == stats["pairs"]
    assert stats["documents"] == 1
    assert stats["requests"] > 2  # a paragraph of 339 tokens split into passages of at most 160
    assert stats["tokens_out"] > 0 and stats["tokens_in"] > stats["requests"] * 100
    tok = bundled.tokenizer
    rejected = [row for f in (out / "rejected").glob("*.parquet") for _, row in read_rows(f)]
    pairs = pairs_of(out)
    assert stats["pairs"] == len(pairs) >= 1 and stats["rejected"] == len(rejected) >= 1
    assert stats["documents_with_pairs"] == len({p["doc_id"] for p in pairs})
    assert stats["parse_rate"] >= stats["documents_with_pairs"] / 2  # parsed before the filters judge the pairs
    for row in pairs:
        pair = Pair.model_validate(row)
        assert pair.doc_id == "paragraphs.jsonl:1" and pair.context in texts[0]
        assert len(tok(pair.context, add_special_tokens=False)["input_ids"]) <= 160
        assert pair.generator == f"{BUNDLED}|prompted|{prompts.PROMPT_VERSION}"
    for row in rejected:
        assert row["reason"] and row["output"] is not None

    # a finished folder is a no-op: nothing rewritten, nothing generated
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run(recipe, docs, out) == stats
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp


def test_static_cache_path_matches_dynamic(bundled):
    from ezoforge.infer.backends import TransformersBackend

    reqs = [prompts.synthesizer("a", "梅雨は雨季の一種である。"), prompts.synthesizer("b", "富士山は日本一高い山で、標高は3776メートル。")]
    results = {}
    for static in (False, True):
        got = {}
        TransformersBackend(bundled.tokenizer, bundled.context_length, lambda: bundled, 2, static).run(
            reqs, Sampling(12), lambda i, out: got.__setitem__(i, out))
        results[static] = got
    assert {i: o.text for i, o in results[True].items()} == {i: o.text for i, o in results[False].items()}
    assert all(o.completion_tokens == 12 or o.finish_reason == "stop" for o in results[True].values())


def test_vllm_missing_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": "1", "text": "本文です。"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ezoforge\[gpu\]"):
        run(load_recipe(None, ["synth.backend=vllm"]), docs, tmp_path / "out")


# ---------------------------------------------------------------- openai backend against `ezo serve`

def test_openai_backend_against_ezo_serve(live_server, tmp_path):
    docs, _ = paragraphs(tmp_path, 2)
    recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={live_server}/v1", f"synth.model={BUNDLED}",
                                "synth.generation.max_new_tokens=24", "synth.concurrency=2"])
    stats = run(recipe, docs, tmp_path / "out", allow_empty=True)
    assert stats["requests"] == stats["requests_sent"] >= 2 and stats["errors"] == 0
    assert stats["tokens_in"] > 500 and 0 < stats["tokens_out"] <= 24 * stats["requests"]
    rejected = [row for f in (tmp_path / "out" / "rejected").glob("*.parquet") for _, row in read_rows(f)]
    # every reply reached the parser behind the prefill the server was asked to continue (24 tokens cut them all)
    assert rejected and all(r["output"].startswith("質問1: ") for r in rejected)
    assert stats["pairs"] == len(pairs_of(tmp_path / "out"))
    assert stats["generator"] == f"{BUNDLED}|prompted|{prompts.PROMPT_VERSION}"


# Slow: `make test` holds its parts, the same prompt ids in process and through `ezo serve`
# (test_backends_render.py) and the same greedy answers both ways (test_eval_backends.py).
@pytest.mark.slow
def test_openai_backend_against_ezo_serve_matches_transformers(bundled, live_server, tmp_path):
    """Parity at temperature 0: the server continues the prefill, so it sees the prompt the local backend renders
    and writes the same greedy text (batch 1 on both sides: no padding to tell them apart)."""
    _, texts = paragraphs(tmp_path, 1)
    # One request a side: the paragraph's first passage, from which the model keeps a pair at 64 tokens (a 135M
    # model decodes a few tokens a second on this CPU, so each request costs seconds).
    first = split(texts[0], 256, lambda text: len(bundled.tokenizer(text, add_special_tokens=False)["input_ids"]))[0]
    docs = tmp_path / "passage.jsonl"
    docs.write_text(json.dumps({"text": first}, ensure_ascii=False) + "\n", encoding="utf-8")
    common = ["synth.generation.max_new_tokens=64", "synth.max_passage_tokens=256", "synth.pairs_per_doc=1"]
    local = run(load_recipe(None, common + ["synth.backend=transformers", "synth.generation.batch_size=1"]), docs,
                tmp_path / "local")
    served = run(load_recipe(None, common + ["synth.backend=openai", f"synth.base_url={live_server}/v1",
                                             f"synth.model={BUNDLED}", "synth.concurrency=1"]), docs, tmp_path / "http")
    assert served["requests"] == local["requests"] == 1 and served["errors"] == 0

    def outputs(out):
        with closing(sqlite3.connect(out / "requests.sqlite")) as db:
            values = [json.loads(v) for (v,) in db.execute("SELECT value FROM responses")]
        return sorted((v["prompt_tokens"], v["text"]) for v in values)

    assert outputs(tmp_path / "http") == outputs(tmp_path / "local")  # same prompt sizes, same greedy text
    assert served["documents_with_pairs"] == local["documents_with_pairs"] == 1
    assert pairs_of(tmp_path / "http") == pairs_of(tmp_path / "local")


# ---------------------------------------------------------------- a scripted OpenAI-compatible server

class Script:
    """Per tag (a word in the request's last message), what to answer on each hit; the last step repeats.
    Steps: ("ok",), ("status", code, headers), ("stall", seconds), ("block", threading.Event)."""

    def __init__(self, plan=None, continues=True):
        self.plan = plan or {}
        self.continues = continues  # False: reject `continue_final_message` with 400, as a plain OpenAI server does
        self.hits = Counter()
        self.times = defaultdict(list)
        self.bodies = Counter()
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.post("/v1/chat/completions")
        async def completions(request: Request):
            body = await request.json()
            text = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
            named = re.search(r"これは(\S+?)についての本文", text)
            tag = next((t for t in self.plan if t in text), named.group(1) if named else text[:8])
            with self.lock:
                n = self.hits[tag]
                self.hits[tag] += 1
                self.times[tag].append(time.monotonic())
                self.bodies[json.dumps(body, sort_keys=True, ensure_ascii=False)] += 1
            if body.get("continue_final_message") and not self.continues:
                return JSONResponse({"error": {"message": "Unrecognized request argument supplied: "
                                                          "continue_final_message", "type": "invalid_request_error"}},
                                    status_code=400)
            steps = self.plan.get(tag, [("ok",)])
            step = steps[min(n, len(steps) - 1)]
            if step[0] == "status":
                return JSONResponse({"error": {"message": f"scripted {step[1]}", "type": "scripted"}},
                                    status_code=step[1], headers=step[2] if len(step) > 2 else None)
            if step[0] == "stall":
                await asyncio.sleep(step[1])
            if step[0] == "block":
                while not step[1].is_set():
                    await asyncio.sleep(0.02)
            reply = f" {tag}について書かれています。\n質問2: {tag}とは何ですか。\n回答2: {tag}は本文の題材です。"
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}

        @app.post("/v1/completions")
        async def plain(request: Request):
            body = await request.json()
            with self.lock:
                self.bodies[json.dumps(body, sort_keys=True, ensure_ascii=False)] += 1
            reply = ("<QUE> この本文は何の例ですか。 <ANS> 合成の例です。 </END>\n\n"
                     "<QUE> この本文は何の例ですか。 <ANS> 重複です。 </END>\n\n<QUE> 途中")
            return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "text": reply, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40}}

        return app


def write_docs(tmp_path, tags):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": t, "text": f"これは{t}についての本文です。{t}は例です。"},
                                       ensure_ascii=False) + "\n" for t in tags), encoding="utf-8")
    return path


def test_client_retries_what_it_should_and_nothing_else():
    script = Script({"limited": [("status", 429, {"Retry-After": "2"}), ("ok",)],
                     "broken": [("status", 500), ("ok",)],
                     "bad": [("status", 400)],
                     "slow": [("stall", 3), ("ok",)],
                     "down": [("status", 503)]})
    with BackgroundServer(script.app()) as url:
        client = make_client(url + "/v1", timeout=1.0, max_retries=2)

        def ask(tag):
            return chat(client, "m", [{"role": "user", "content": tag}], max_tokens=8)

        for tag in ("limited", "broken", "slow"):
            assert "について書かれています" in ask(tag).text
            assert script.hits[tag] == 2, tag
        gap = script.times["limited"][1] - script.times["limited"][0]
        assert 1.9 <= gap < 5  # Retry-After: 2 honoured, not the default sub-second backoff
        with pytest.raises(RemoteError) as e:
            ask("bad")
        assert e.value.status == 400 and script.hits["bad"] == 1  # a 4xx other than 408/409/429 is never retried
        with pytest.raises(RemoteError) as e:
            ask("down")
        assert e.value.status == 503 and script.hits["down"] == 3  # first try + max_retries


def test_failed_request_is_an_error_for_its_document_never_text(tmp_path):
    script = Script({"文書A": [("status", 429, {"Retry-After": "1"}), ("ok",)],
                     "文書B": [("status", 500), ("ok",)],
                     "文書C": [("status", 400)],
                     "文書D": [("stall", 3), ("ok",)]})
    docs = write_docs(tmp_path, ["文書A", "文書B", "文書C", "文書D"])
    with BackgroundServer(script.app()) as url:
        recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=scripted",
                                    "synth.timeout=1", "synth.max_retries=2", "synth.max_error_fraction=0.5"])
        stats = run(recipe, docs, tmp_path / "out")
    assert dict(script.hits) == {"文書A": 2, "文書B": 2, "文書C": 1, "文書D": 2}
    assert stats["errors"] == 1 and stats["documents_with_pairs"] == 3
    pairs = pairs_of(tmp_path / "out")
    assert {p["doc_id"] for p in pairs} == {"文書A", "文書B", "文書D"}
    assert not any("scripted" in p["response"] for p in pairs)
    errors = [r for f in (tmp_path / "out" / "rejected").glob("*.parquet") for _, r in read_rows(f)
              if r["reason"] == "request_error"]
    assert [(r["doc_id"], "HTTP 400" in r["text"]) for r in errors] == [("文書C", True)]


def test_too_many_failures_fail_the_stage_and_a_rerun_sends_only_those(tmp_path):
    script = Script({"文書A": [("status", 400), ("ok",)]})
    docs = write_docs(tmp_path, ["文書A", "文書B"])
    with BackgroundServer(script.app()) as url:
        recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=scripted",
                                    "synth.max_retries=0"])
        with pytest.raises(Exception, match="1 of 2 requests failed"):
            run(recipe, docs, tmp_path / "out")
        assert not (tmp_path / "out" / "DONE").exists()
        stats = run(recipe, docs, tmp_path / "out")
    assert stats["errors"] == 0 and stats["requests_sent"] == 1
    assert dict(script.hits) == {"文書A": 2, "文書B": 1}


def test_killed_run_resumes_without_sending_any_request_twice(tmp_path):
    release = threading.Event()
    tags = [f"文書{i:02d}" for i in range(8)]
    docs = write_docs(tmp_path, tags)
    blocked = draw(read_docs([docs]), None, None, 0, "")[3].id  # requests go out in the drawn order
    script = Script({blocked: [("block", release), ("ok",)]})
    out = tmp_path / "out"
    with BackgroundServer(script.app()) as url:
        args = ["--backend", "openai", "--base-url", f"{url}/v1", "--model", "scripted", "--concurrency", "1"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "ezoforge", "synth", str(docs), "--out", str(out), *args],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 120
            while script.hits[blocked] == 0:  # three requests answered, the fourth in flight
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            release.set()
        assert not (out / "DONE").exists()
        recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=scripted",
                                    "synth.concurrency=1"])
        stats = run(recipe, docs, out)
    assert stats["requests_sent"] == 5 and stats["documents"] == 8 and (out / "DONE").exists()
    assert [script.hits[t] for t in tags] == [2 if t == blocked else 1 for t in tags]  # only the one in flight
    assert all(n == 1 for body, n in script.bodies.items() if blocked not in body)
    assert {p["doc_id"] for p in pairs_of(out)} == set(tags)


def test_synthesizer_mode_over_a_completions_endpoint(tmp_path):
    script = Script()
    docs = write_docs(tmp_path, ["文書A"])
    with BackgroundServer(script.app()) as url:
        recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=synth",
                                    "synth.mode=synthesizer"])
        stats = run(recipe, docs, tmp_path / "out")
    (body,) = [json.loads(b) for b in script.bodies]
    assert body["prompt"] == "<CON> これは文書Aについての本文です。文書Aは例です。 </CON>\n\n"  # the server adds BOS
    assert [(p["instruction"], p["response"]) for p in pairs_of(tmp_path / "out")] == [("この本文は何の例ですか。", "合成の例です。")]
    rejected = sorted(r["reason"] for f in (tmp_path / "out" / "rejected").glob("*.parquet") for _, r in read_rows(f))
    assert rejected == ["repeated_question", "unterminated"]
    assert stats["generator"] == f"synth|synthesizer|{prompts.SYNTHESIZER_VERSION}"


# ---------------------------------------------------------------- the mix of sources, and prefill over HTTP

def curated(tmp_path, wiki, web):
    """A curate output as curate writes it: one shard of Wikipedia documents, then one of web documents."""
    folder = tmp_path / "curated"
    for n, (source, tags) in enumerate((("wikipedia", wiki), ("fineweb", web))):
        write_parquet(folder / "data" / f"{n:05d}.parquet", [
            {"id": t, "text": f"これは{t}についての本文です。{t}は例です。", "source": source} for t in tags])
    Stage("curate", folder, {}).finish({})
    return folder


def test_both_sources_reach_synthesis_and_a_raised_limit_reuses_the_cache(tmp_path):
    wiki, web = [f"百科{i}" for i in range(6)], [f"ウェブ{i}" for i in range(6)]
    docs = curated(tmp_path, wiki, web)
    script = Script()
    with BackgroundServer(script.app()) as url:
        base = ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=scripted"]
        out = tmp_path / "synth"
        stats = run(load_recipe(None, base + ["synth.limit=4"]), docs, out)
        pairs = pairs_of(out)
        with pytest.raises(ConfigError, match="synth.limit: 4 → 6"):  # an output setting: refused, folder kept
            run(load_recipe(None, base + ["synth.limit=6"]), docs, out)
        larger = run(load_recipe(None, base + ["synth.limit=6"]), docs, out, force=True)
    assert stats["mix"] == {"fineweb": 0.5, "wikipedia": 0.5}
    assert stats["by_source"] == {s: {"documents": 2, "passages": 2, "documents_with_pairs": 2, "pairs": 4}
                                  for s in ("fineweb", "wikipedia")}
    assert {(p["source"], p["doc_id"] in wiki) for p in pairs} == {("wikipedia", True), ("fineweb", False)}
    # nested: the 4 documents of limit 4 are among those of limit 6; the forced redo keeps the keyed answers
    assert {p["doc_id"] for p in pairs} < {p["doc_id"] for p in pairs_of(out)}
    assert larger["requests_sent"] == 2 and sum(script.hits.values()) == 6


def test_the_prefill_is_continued_by_the_server_or_given_in_the_user_message(tmp_path, caplog):
    docs = write_docs(tmp_path, ["文書A", "文書B", "文書C"])
    for continues in (True, False):
        script = Script(continues=continues)
        with BackgroundServer(script.app()) as url, caplog.at_level(logging.WARNING):
            caplog.clear()
            recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=scripted"])
            stats = run(recipe, docs, tmp_path / f"out-{continues}")
        bodies = [json.loads(b) for b, n in script.bodies.items() for _ in range(n)]
        continued = [b for b in bodies if b.get("continue_final_message")]
        for b in continued:  # the prompt a local backend renders: the prefill is the open assistant turn
            assert b["add_generation_prompt"] is False and b["messages"][-1]["role"] == "assistant"
            assert b["messages"][-1]["content"].startswith("質問1: ") and "次の続き" not in json.dumps(b)
        warnings = [r.getMessage() for r in caplog.records if "continue_final_message" in r.getMessage()]
        if continues:
            assert len(continued) == len(bodies) == 3 and not warnings
        else:  # refused once on the first request, then the instruction wording for every request
            assert len(continued) == 1 and len(bodies) == 4 and len(warnings) == 1
            assert all("次の続きを書いてください。\n質問1: " in b["messages"][-1]["content"]
                       for b in bodies if b not in continued)
        assert stats["errors"] == 0 and stats["documents_with_pairs"] == 3
        assert all(p["response"].endswith("は本文の題材です。") for p in pairs_of(tmp_path / f"out-{continues}")
                   if p["instruction"].endswith("とは何ですか。"))
