"""`ezo serve` limits, recipe defaults, fuzzed requests, and a bounded load-and-fault run (loopback only)."""
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from ezoforge.config import ServeConfig
from ezoforge.infer.generate import Generator
from ezoforge.infer.serve import BackgroundServer, create_app

MESSAGES = [{"role": "user", "content": "日本の首都はどこですか？"}]


def post(url, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"},
                      timeout=kw.pop("timeout", 600), **kw)


def is_error_body(resp) -> bool:
    err = resp.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def gen(bundled):
    return Generator(bundled)


def test_body_over_the_limit_is_413(live_server):
    big = {"messages": [{"role": "user", "content": "猫" * 400_000}]}  # 1.2 MB of UTF-8, over the 1 MiB default
    resp = post(live_server, big)
    assert resp.status_code == 413 and is_error_body(resp) and resp.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}]}'

    resp = httpx.post(f"{live_server}/v1/chat/completions", content=chunked(),
                      headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 413 and is_error_body(resp)


def test_full_queue_is_429_with_retry_after_and_timeout_is_504(gen):
    app = create_app(gen, "m", limits=ServeConfig(max_batch=1, max_queue=1, request_timeout=600))
    with BackgroundServer(app) as url, httpx.Client(timeout=600) as client:
        long = {"messages": MESSAGES, "max_tokens": 2000, "temperature": 0, "stream": True}
        with client.stream("POST", f"{url}/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            with client.stream("POST", f"{url}/v1/chat/completions", json=long) as waiting:
                # Held in a name: a dropped line iterator closes the connection, and the server rightly cancels.
                waiting_lines = waiting.iter_lines()
                assert next(waiting_lines).startswith("data: ")  # accepted: it waits in the queue
                assert httpx.get(f"{url}/health").json()["waiting"] == 1
                resp = post(url, {"messages": MESSAGES, "max_tokens": 4})
                assert resp.status_code == 429 and is_error_body(resp)
                assert int(resp.headers["retry-after"]) >= 1 and resp.json()["error"]["type"] == "rate_limit_error"
    app = create_app(gen, "m", limits=ServeConfig(request_timeout=1))
    with BackgroundServer(app) as url:
        resp = post(url, {"messages": MESSAGES, "max_tokens": 3000, "temperature": 0})
        assert resp.status_code == 504 and is_error_body(resp)
        assert resp.json()["error"]["code"] == "request_timeout"


def test_recipe_defaults_system_prompt_and_max_tokens(gen):
    system = "あなたは日本語で簡潔に答えるアシスタントです。"
    with_system = create_app(gen, "m", system_prompt=system, max_tokens=3)
    without = create_app(gen, "m", system_prompt=None, max_tokens=3)
    with BackgroundServer(with_system) as a, BackgroundServer(without) as b:
        added = post(a, {"messages": MESSAGES, "temperature": 0}).json()
        own = post(b, {"messages": [{"role": "system", "content": system}] + MESSAGES, "temperature": 0}).json()
        kept = post(a, {"messages": [{"role": "system", "content": "Be brief."}] + MESSAGES, "temperature": 0}).json()
        plain = post(b, {"messages": MESSAGES, "temperature": 0}).json()
    assert added["usage"]["prompt_tokens"] == own["usage"]["prompt_tokens"]  # the recipe's system prompt went in
    assert added["choices"][0]["message"]["content"] == own["choices"][0]["message"]["content"]
    assert kept["usage"]["prompt_tokens"] != added["usage"]["prompt_tokens"]  # a request's own system wins
    assert plain["usage"]["prompt_tokens"] != added["usage"]["prompt_tokens"]
    assert added["usage"]["completion_tokens"] <= 3 and plain["usage"]["completion_tokens"] <= 3


VALUES = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**64, -(2**70), 10**30, 1e308, -1e-9, 0.5, 3.7, "", "x",
          "日本語", "\u0000", "\ud800", "🙂" * 50, "長" * 5000, [], [1, 2], {}, {"a": 1}, ["a", "b"], "1" * 5000]
VALID = {"model": ["m"], "max_tokens": [1, 2], "max_completion_tokens": [2], "temperature": [0, 0.7, 2],
         "top_p": [0.5, 1], "stop": ["。", ["\n", "は"], "日本語"], "seed": [0, 2**63, -5], "stream": [True, False],
         "n": [1], "response_format": [{"type": "text"}], "add_generation_prompt": [True, False],
         "continue_final_message": [False], "messages": [[{"role": "user", "content": "日本語"}]]}


def fuzz_bodies(rng: random.Random, count: int):
    for _ in range(count):
        body = {"messages": [{"role": rng.choice(["user"] * 4 + ["assistant", "system", "developer", "tool", 3, ""]),
                              "content": rng.choice(VALUES + ["こんにちは"] * 10)}
                             for _ in range(rng.randint(0, 3))], "max_tokens": rng.choice([1, 2, 3])}
        for name in rng.sample(sorted(VALID), rng.randint(1, 4)):
            body[name] = rng.choice(VALID[name] if rng.random() < 0.6 else VALUES)
        if rng.random() < 0.1:
            body["response_format"] = rng.choice([{"type": "json_object"}, {"type": "json_schema"},
                                                  {"type": "json_schema", "json_schema": {"schema": rng.choice(VALUES)}}])
        yield body
    yield '{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + "9" * 5000 + "}"  # over int() limits
    yield b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'  # not UTF-8
    yield "[1, 2, 3]"
    yield ""


def test_fuzzed_fields_never_get_500_and_never_kill_the_server(gen):
    app = create_app(gen, "m", max_tokens=2, limits=ServeConfig(request_timeout=60, max_queue=256))
    rng = random.Random(12)
    with BackgroundServer(app) as url:

        def send(body):
            return body, post(url, body)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, fuzz_bodies(rng, 160)))
        statuses = sorted({r.status_code for _, r in results})
        bad = [(b, r.status_code, r.text[:200]) for b, r in results if r.status_code >= 500]
        assert not bad, bad[:3]
        for body, resp in results:
            if resp.status_code != 200:
                assert is_error_body(resp), (body, resp.text[:200])
        assert 200 in statuses and 400 in statuses
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert post(url, {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_load_with_dropped_streams(gen):
    """32 requests at concurrency 16, a quarter of them streams dropped after their first chunk: every other
    request completes with a well-formed body, the dropped ones stop generating, an idle request afterwards takes
    at most twice its idle latency, and the process's memory returns near where it started."""
    app = create_app(gen, "m", limits=ServeConfig(max_batch=16, max_queue=64))
    proc = psutil.Process()
    probe = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}

    def latency(url):
        start = time.perf_counter()
        assert post(url, probe).status_code == 200
        return time.perf_counter() - start

    with BackgroundServer(app) as url:
        latency(url)  # warm-up
        idle = min(latency(url) for _ in range(2))
        rss_start = proc.memory_info().rss

        def one(i):
            body = {"messages": [{"role": "user", "content": f"{i}番目の質問: 日本の山について教えてください。"}],
                    "temperature": 0}
            if i % 4 == 0:  # dropped: a long stream the client abandons after its first chunk
                with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "max_tokens": 1000,
                                  "stream": True}, timeout=600) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            return "dropped"
            if i % 2:
                chunks = []
                with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "max_tokens": 12,
                                  "stream": True}, timeout=600) as resp:
                    assert resp.status_code == 200
                    chunks = [line for line in resp.iter_lines() if line.startswith("data: ")]
                assert chunks[-1] == "data: [DONE]"
                parsed = [json.loads(c[6:]) for c in chunks[:-1]]
                assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
                return "streamed"
            resp = post(url, {**body, "max_tokens": 12})
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] is not None
            return "plain"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(32)))
        assert outcomes.count("dropped") == 8 and len(outcomes) == 32
        for _ in range(300):  # the abandoned generations leave the batch at their next step
            if httpx.get(f"{url}/health").json()["running"] == 0:
                break
            time.sleep(0.1)
        assert httpx.get(f"{url}/health").json() | {"running": 0, "waiting": 0} == httpx.get(f"{url}/health").json()
        after = min(latency(url) for _ in range(2))
        rss_end = proc.memory_info().rss
    print(f"idle {idle:.2f} s, after load {after:.2f} s; RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")
    assert after <= 2 * idle
    assert rss_end - rss_start < 128 * 2**20  # without malloc_trim when idle it stayed ~210 MiB up


def test_a_plain_request_whose_client_left_stops_generating(gen):
    """Not only streams: a non-streaming client that gives up frees its place in the batch within seconds."""
    app = create_app(gen, "m")
    with BackgroundServer(app) as url:
        body = {"messages": MESSAGES, "max_tokens": 1500, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            post(url, body, timeout=httpx.Timeout(600, read=2))
        start = time.perf_counter()
        while httpx.get(f"{url}/health").json()["running"] and time.perf_counter() - start < 30:
            time.sleep(0.1)
        left = time.perf_counter() - start
    # 1500 tokens take minutes here; the server notices a gone client once a second and cancels at the next step.
    assert left < 10, left
