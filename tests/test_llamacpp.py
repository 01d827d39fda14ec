"""The llamacpp backend: llama.cpp running the f16 GGUF our exporter writes from the bundled model (once, into the
cache) answers like the transformers backend, decodes several sequences together as it decodes them one at a time
(both up to near-ties), samples reproducibly, and is refused where it cannot answer as stated. One llama.cpp
thread: its threads spin while they wait, and the tests share the cores."""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

import httpx
import numpy as np
import pytest
import torch

from conftest import BUNDLED
from ezoforge.cache import request_key
from ezoforge.config import ModelConfig, ServeConfig
from ezoforge.errors import ConfigError
from ezoforge.eval.run import _Models, run
from ezoforge.eval.settings import EvalConfig
from ezoforge.infer.backends import Request, Target, TransformersBackend
from ezoforge.infer.engines import choose, in_own_thread, pick_backend
from ezoforge.infer.generate import Sampling, build_messages
from ezoforge.infer.llamacpp import LlamaCppBackend
from ezoforge.models import resolve
from ezoforge.stages import Recipe
from ezoforge.synth.settings import SynthConfig

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (the `cpu` extra; "
                                     "`make install` builds it where a compiler is present)")
GREEDY = Sampling(max_new_tokens=32)
NEAR_TIE = 0.1  # logits apart by less than this may swap order under float16 weights
TASKS = f"elyza100:{files('ezoforge') / 'data' / 'tasks' / 'demo-tasks.jsonl'}"


def settings() -> EvalConfig:
    return EvalConfig.model_validate({"backend": "llamacpp", "llamacpp": {"threads": 1}})


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    """The eight shortest Japanese tasks of the package's demo set, as chat requests."""
    lines = (files("ezoforge") / "data" / "tasks" / "demo-tasks.jsonl").read_text(encoding="utf-8").splitlines()
    tasks = sorted((json.loads(line)["input"] for line in lines), key=len)[:8]
    return [Request(str(i), "", messages=tuple((m["role"], m["content"]) for m in build_messages(task, None)))
            for i, task in enumerate(tasks)]


@pytest.fixture(scope="module")
def llama(requests):
    """The backend on the bundled model's safetensors folder, so the GGUF llama.cpp reads is our exporter's f16 file;
    with the greedy answers to all eight requests decoded together."""
    backend = LlamaCppBackend.build(settings(), Target(resolve(BUNDLED)))
    together = {}
    backend.run(requests, GREEDY, together.__setitem__)
    yield backend, [together[i] for i in range(len(requests))]
    backend.close()


def ran(backend, reqs, sampling) -> list:
    outs = {}
    backend.run(reqs, sampling, outs.__setitem__)
    return [outs[i] for i in range(len(reqs))]


def parting(a: list[int], b: list[int]) -> int | None:
    """Where two token lists first differ (None: they do not)."""
    return None if a == b else next(j for j, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)


def random_tokens(rng, n: int) -> list[int]:
    return [int(t) for t in rng.integers(100, 40000, n)]


@contextlib.contextmanager
def claimed(engine, n: int, cells: int):
    """n of the engine's sequences, released afterwards: the module's backend answers the other tests too."""
    slots = [engine.claim(cells) for _ in range(n)]
    try:
        yield slots
    finally:
        for slot in slots:
            engine.release(slot)


def hesitation(bundled, prompt: list[int], prefix: list[int]) -> float:
    """How far apart the transformers model's two best next tokens are after prompt + prefix (float32 logits)."""
    with torch.no_grad():
        best = bundled.model(torch.tensor([prompt + prefix])).logits[0, -1].topk(2).values
    return float(best[0] - best[1])


@needs_llama_cpp
def test_greedy_answers_agree_with_the_transformers_backend(llama, requests, bundled):
    backend, answers = llama
    assert backend.gen.engine.sequences == 8  # generation.batch_size: all eight decoded together
    reference = ran(TransformersBackend.build(EvalConfig(), Target(BUNDLED, load=lambda: bundled)), requests, GREEDY)
    agree = total = 0
    for req, ours, theirs in zip(requests, answers, reference):
        assert ours.prompt_tokens == theirs.prompt_tokens  # the same prompt ids
        a, b = (backend.tokenizer(o.text, add_special_tokens=False)["input_ids"] for o in (ours, theirs))
        agree += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        if (at := parting(a, b)) is not None:  # float16 weights flip a near-tie, nothing else
            assert hesitation(bundled, backend.prompt_ids(req), b[:at]) < NEAR_TIE, (ours.text, theirs.text)
    print(f"token agreement llamacpp f16 GGUF vs transformers float32: {agree}/{total} = {agree / total:.1%}")
    assert agree / total >= 0.9


@needs_llama_cpp
def test_decoding_together_equals_one_at_a_time(llama, requests, bundled):
    """Up to float rounding: llama.cpp multiplies a one-token batch with other kernels than a larger one (logits
    move by ~0.02), which may flip a near-tie in one reply, never anything else."""
    backend, together = llama
    alone = [ran(backend, [req], GREEDY)[0] for req in requests[:4]]
    assert all(o.completion_tokens == 32 and o.finish_reason == "length" for o in alone)  # nothing ended early
    parted = 0
    for req, a, t in zip(requests, alone, together):
        a_ids, t_ids = (backend.tokenizer(o.text, add_special_tokens=False)["input_ids"] for o in (a, t))
        if (at := parting(a_ids, t_ids)) is not None:
            parted += 1
            assert hesitation(bundled, backend.prompt_ids(req), a_ids[:at]) < NEAR_TIE, (a.text, t.text)
    assert parted <= 1, [(a.text, t.text) for a, t in zip(alone, together)]


@needs_llama_cpp
def test_a_call_s_prompts_are_all_queued_before_the_first_decodes(llama, requests, monkeypatch):
    """Which sequences decode together sets each reply's rounding (above): a call queues all its prompts before the
    loop admits any, however slowly they are queued, so the same call gives the same replies run to run."""
    from ezoforge.infer.batching import Batcher

    backend, _ = llama
    submit, joining, sizes = Batcher.submit, Batcher._joining, []

    def slow_submit(self, *args, **kwargs):
        job = submit(self, *args, **kwargs)
        time.sleep(0.05)  # time enough for the loop to start on what is queued so far, if it could
        return job

    def recording(self, rows):
        if self.waiting:
            sizes.append(len(self.waiting) + len(rows))
        return joining(self, rows)

    monkeypatch.setattr(Batcher, "submit", slow_submit)
    monkeypatch.setattr(Batcher, "_joining", recording)
    first = ran(backend, requests[:4], GREEDY)
    assert sizes[0] == 4, sizes
    assert [o.text for o in ran(backend, requests[:4], GREEDY)] == [o.text for o in first]


@needs_llama_cpp
def test_a_prompt_starting_with_the_shared_prefix_reads_the_logits_a_full_prefill_gives(llama):
    """Two prompts with 200 tokens in common make those the shared prefix; a third starting with them copies their
    cells and prefills only the rest, with the logits of a prefill from scratch."""
    engine = llama[0].generator().engine
    rng = np.random.default_rng(0)
    head = random_tokens(rng, 200)
    a, b, c = (head + random_tokens(rng, n) for n in (50, 60, 70))
    with claimed(engine, 4, 400) as slots, engine.lock:
        for slot, prompt in zip(slots, (a, b)):
            assert engine.start_from_shared(slot, prompt) == 0  # nothing shared yet
            engine.feed([(slot, 0, prompt)])
            engine.remember(slot, prompt)
        assert engine.shared == head
        start = engine.start_from_shared(slots[2], c)
        shared = engine.feed([(slots[2], start, c[start:])])
        scratch = engine.feed([(slots[3], 0, c)])
    assert start == 200
    assert np.array_equal(shared, scratch)


@needs_llama_cpp
def test_prompts_joining_together_read_their_common_start_once(llama):
    """Prompts prefilled together make what they all start with the shared prefix before any of them is read; each
    then copies it and reads only the rest, with the logits a prefill from scratch gives (rests of 64 tokens or more:
    llama.cpp multiplies fewer rows with other kernels)."""
    engine = llama[0].generator().engine
    rng = np.random.default_rng(1)
    head = random_tokens(rng, 150)
    a, b = (head + random_tokens(rng, n) for n in (70, 80))
    with claimed(engine, 3, 400) as slots, engine.lock:
        engine.share([a, b, head + a[150:160]])
        assert engine.shared == head
        starts = [engine.start_from_shared(slot, p) for slot, p in zip(slots, (a, b))]
        shared = engine.feed([(slots[0], 150, a[150:])])
        scratch = engine.feed([(slots[2], 0, a)])
    assert starts == [150, 150]
    assert np.array_equal(shared, scratch)


@needs_llama_cpp
def test_logits_come_back_in_the_order_of_the_parts_whatever_their_slots(llama):
    """The engine feeds parts in slot order (llama.cpp steps fewer times so); each row of logits stays its part's."""
    engine = llama[0].generator().engine
    rng = np.random.default_rng(2)
    p, q = (random_tokens(rng, n) for n in (20, 30))
    with claimed(engine, 4, 100) as slots, engine.lock:
        ordered = engine.feed([(slots[0], 0, p), (slots[1], 0, q)])
        reversed_ = engine.feed([(slots[3], 0, q), (slots[2], 0, p)])
    assert not np.allclose(ordered[0], ordered[1])
    assert np.array_equal(ordered, reversed_[::-1])


@needs_llama_cpp
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llama, requests):
    backend, _ = llama
    sampled = Sampling(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    together = ran(backend, requests[:2], sampled)
    assert ran(backend, requests[1:2], sampled)[0].text == together[1].text  # its own seeded draw, run again alone
    reseeded = Sampling(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=8)
    assert ran(backend, requests[1:2], reseeded)[0].text != together[1].text


@needs_llama_cpp
def test_answers_are_cached_apart_from_the_transformers_ones():
    # transformers' answers are keyed by the model's fingerprint alone; llama.cpp's name the backend and the GGUF
    # it runs too (the bundled model ran as its Q4_1 file before: those answers are not these)
    ours = _Models(ModelConfig(name=BUNDLED), None, settings()).answer_identity("fp")
    assert ours == request_key(model="fp:llamacpp:f16-export", backend="llamacpp")[:16]
    assert ours != request_key(model="fp", backend="llamacpp")[:16]


def test_torch_work_in_its_own_thread_takes_its_openmp_threads_with_it():
    """Torch's OpenMP workers live as long as the thread that computed: left on the main thread they would make
    libgomp throttle llama.cpp's own team later in the process."""
    code = ("import os, time, torch\n"
            "from ezoforge.infer.engines import in_own_thread\n"
            "threads = lambda: len(os.listdir('/proc/self/task'))\n"
            "work = lambda: torch.randn(1 << 20).tanh().sum().item()\n"
            "def settled(n):  # a finished thread's OpenMP workers exit on their own, a moment later\n"
            "    for _ in range(100):\n"
            "        if threads() == n: break\n"
            "        time.sleep(0.05)\n"
            "    return threads()\n"
            "start = threads(); in_own_thread(work); apart = settled(start); work(); here = threads()\n"
            "print(start, apart, here)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True,
                         capture_output=True, text=True).stdout
    start, apart, here = map(int, out.split())
    assert apart == start and here == start + 1, out  # one worker beside the computing thread, with 2 threads


def test_in_own_thread_returns_the_value_and_raises_the_error():
    assert in_own_thread(lambda: 6 * 7) == 42
    with pytest.raises(ValueError, match="invalid literal"):
        in_own_thread(lambda: int("x"))


def test_llamacpp_with_an_adapter_is_refused_before_loading(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    recipe = Recipe.model_validate({"model": {"name": BUNDLED}, "eval": {
        "tasks": [TASKS], "limit": 1, "cache": str(tmp_path / "c.sqlite"), "backend": "llamacpp"}})
    with pytest.raises(ConfigError, match=r"eval.backend llamacpp answers with a whole model.*merge it first"):
        run(recipe, tmp_path / "out", adapter=adapter)
    assert not (tmp_path / "out").exists()


def test_llamacpp_settings_under_another_backend_are_refused():
    with pytest.raises(ValueError, match=r"llamacpp.threads is a llamacpp-backend setting; backend 'transformers'"):
        EvalConfig.model_validate({"backend": "transformers", "llamacpp": {"threads": 1}})


@needs_llama_cpp
def test_auto_picks_llamacpp_on_this_cpu_and_says_why_not_where_it_cannot(tmp_path, caplog):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    caplog.set_level("INFO")
    assert pick_backend(EvalConfig(), "eval.backend", BUNDLED).backend == "llamacpp"
    assert "eval.backend=auto: llamacpp" in caplog.text
    assert pick_backend(EvalConfig(), "eval.backend", BUNDLED, adapter).backend == "transformers"
    assert "eval.backend=auto: transformers (an adapter is given" in caplog.text
    assert pick_backend(EvalConfig(backend="vllm"), "eval.backend", BUNDLED).backend == "vllm"  # stated: as it is
    # llama.cpp settings stated under auto stand only where auto picks llama.cpp
    stated = EvalConfig.model_validate({"llamacpp": {"threads": 1}})
    assert pick_backend(stated, "eval.backend", BUNDLED).llamacpp.threads == 1
    with pytest.raises(ConfigError, match=r"llamacpp.threads is stated but eval.backend=auto cannot use llama.cpp: "
                                          r"an adapter is given"):
        pick_backend(stated, "eval.backend", BUNDLED, adapter)
    with pytest.raises(ConfigError, match=r"model.backend is llamacpp but model.quantize is nf4"):
        choose("llamacpp", "model.backend", BUNDLED, quantize="nf4")


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="llama-cpp-python is installed here")
def test_llamacpp_without_llama_cpp_names_the_install():
    with pytest.raises(ConfigError, match=r"synth.backend is llamacpp but llama-cpp-python is not installed: .*pip "
                                          r"install 'ezoforge\[cpu\]'"):
        LlamaCppBackend.build(SynthConfig(backend="llamacpp"), Target(BUNDLED))


@pytest.fixture(scope="module")
def llama_server(llama):
    """`ezo serve`'s app on llama.cpp: the same engine the backend answered with, four sequences at once."""
    from ezoforge.infer.serve import BackgroundServer, create_app

    gen = llama[0].generator()
    with BackgroundServer(create_app(gen, BUNDLED, system_prompt=None, limits=ServeConfig(max_batch=4))) as url:
        yield gen, url


@needs_llama_cpp
def test_ezo_serve_on_llamacpp_batches_cancels_and_constrains(llama_server, llama, requests, bundled):
    """Concurrent requests decode together and answer as the backend does; a stream whose client leaves gives its
    sequence back; a JSON schema holds on llama.cpp too; every sequence is free at the end."""
    from ezoforge.eval.judge_prompt import verdict_schema

    gen, url = llama_server
    _, together = llama

    def ask(req: Request) -> dict:
        body = {"messages": [{"role": r, "content": c} for r, c in req.messages], "max_tokens": 32,
                "temperature": 0, "return_token_ids": True}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()

    def dropped_stream() -> int:
        body = {"messages": [{"role": "user", "content": "日本の歴史を長く説明してください。"}], "max_tokens": 2000,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as resp:
            chunks = 0
            for line in resp.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 5:
                    return chunks  # the client leaves mid-reply

    with ThreadPoolExecutor(6) as pool:
        stream = pool.submit(dropped_stream)
        replies = list(pool.map(ask, requests[:5]))
        assert stream.result() == 5
    parted = 0
    for req, reply, theirs in zip(requests, replies, together):
        assert reply["prompt_token_ids"] == llama[0].prompt_ids(req)  # rendered as every local backend renders
        ours, theirs_ids = (gen.encode(text) for text in (reply["choices"][0]["message"]["content"], theirs.text))
        if (at := parting(ours, theirs_ids)) is not None:  # greedy: as the backend answered, up to a near-tie
            parted += 1
            assert hesitation(bundled, reply["prompt_token_ids"], ours[:at]) < NEAR_TIE, (ours, theirs.text)
    assert parted <= 1
    fmt = verdict_schema(30)
    verdict = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "「東京です」という回答を採点してください。"}], "max_tokens": 96,
        "temperature": 0, "response_format": fmt}).json()
    parsed = json.loads(verdict["choices"][0]["message"]["content"])
    assert set(parsed) == {"reason", "grade"} and parsed["grade"] in range(1, 6)
    deadline = time.monotonic() + 30
    while gen.engine.taken and time.monotonic() < deadline:  # the dropped stream leaves at its next step
        time.sleep(0.1)
    assert not gen.engine.taken
    assert httpx.get(f"{url}/health").json()["running"] == 0
