import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import BUNDLED
from ezoforge.infer.generate import Generator
from ezoforge.infer.serve import BackgroundServer, create_app

MESSAGES = [{"role": "user", "content": "日本の首都はどこですか？"}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def test_openai_client_plain(client):
    resp = client.chat.completions.create(model=BUNDLED, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5


def test_openai_client_streaming_matches_plain(client):
    kwargs = dict(model=BUNDLED, messages=MESSAGES, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == plain
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) > 4


def test_response_format_json_schema_is_enforced(client):
    from ezoforge.eval.judge_prompt import verdict_schema

    fmt = verdict_schema(30)
    ask = [{"role": "user", "content": "「東京です」という回答を採点し、理由を日本語で書いてください。"}]
    resp = client.chat.completions.create(model=BUNDLED, messages=ask, max_tokens=96, temperature=0,
                                          response_format=fmt)
    verdict = json.loads(resp.choices[0].message.content)  # a 135M model, yet always valid under the schema
    assert set(verdict) == {"reason", "grade"} and verdict["grade"] in range(1, 6) and len(verdict["reason"]) <= 30


def test_japanese_strings_pass_the_enforcer():
    from ezoforge.infer.structured import parser

    state = parser({"type": "object", "properties": {"reason": {"type": "string"}}})
    for ch in '{"reason": "日本語の理由、カタカナ。':
        state = state.add_character(ch)
    assert "あ" in state.get_allowed_characters() and '"' in state.get_allowed_characters()


def test_models_and_health(live_server, client):
    assert [m.id for m in client.models.list().data] == [BUNDLED]
    assert httpx.get(f"{live_server}/health").json()["status"] == "ok"


def test_sampling_with_seed_is_reproducible(client):
    kwargs = dict(model=BUNDLED, messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_stop_sequences(client):
    full = client.chat.completions.create(model=BUNDLED, messages=MESSAGES, max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    stop = text[2:4]
    cut = client.chat.completions.create(model=BUNDLED, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()


BAD_REQUESTS = [
    ("malformed JSON", '{"messages": [', None),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("temperature < 0", {"messages": MESSAGES, "temperature": -0.1}, "temperature"),
    ("temperature > 2", {"messages": MESSAGES, "temperature": 2.5}, "temperature"),
    ("NaN temperature", '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    ("infinite top_p", '{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', "top_p"),
    ("max_tokens < 1", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("over the context", {"messages": MESSAGES, "max_tokens": 9000}, "max_tokens"),
    ("prompt alone over the context", {"messages": [{"role": "user", "content": "猫 " * 9000}]}, "messages"),
    ("wrong type", {"messages": MESSAGES, "max_tokens": "lots"}, "max_tokens"),
    ("n > 1", {"messages": MESSAGES, "n": 2}, "n"),
    ("token ids streamed", {"messages": MESSAGES, "stream": True, "return_token_ids": True}, "return_token_ids"),
    ("unknown response_format", {"messages": MESSAGES, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("json_schema without a schema", {"messages": MESSAGES, "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("unusable schema", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("name, body, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_with_openai_error_body(live_server, name, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    resp = httpx.post(f"{live_server}/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    if name.startswith(("over", "prompt alone")):
        assert err["code"] == "context_length_exceeded"


def test_token_ids_are_returned_when_asked(live_server, bundled):
    """vLLM's `return_token_ids`: the prompt as this server rendered it, and the reply's tokens."""
    body = {"model": BUNDLED, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    plain = httpx.post(f"{live_server}/v1/chat/completions", json=body, timeout=60).json()
    resp = httpx.post(f"{live_server}/v1/chat/completions", json={**body, "return_token_ids": True}, timeout=60).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
    tok = bundled.tokenizer
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert resp["prompt_token_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert len(resp["prompt_token_ids"]) == resp["usage"]["prompt_tokens"]
    reply = resp["choices"][0]
    assert len(reply["token_ids"]) == resp["usage"]["completion_tokens"]
    assert reply["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert reply["message"]["content"] in tok.decode(reply["token_ids"], skip_special_tokens=True)


def test_unknown_model_and_route(live_server):
    resp = httpx.post(f"{live_server}/v1/chat/completions", json={"model": "other", "messages": MESSAGES})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = httpx.get(f"{live_server}/v1/nothing")
    assert resp.status_code == 404 and "error" in resp.json()


def test_concurrent_requests_are_all_served(client, live_server):
    def ask(i):
        return client.chat.completions.create(model=BUNDLED, messages=MESSAGES, max_tokens=8, temperature=0,
                                              stream=bool(i % 2))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, i) for i in range(6)]
        # a bad request in the middle of the crowd must not disturb the others
        bad = httpx.post(f"{live_server}/v1/chat/completions", json={"messages": []})
        results = [f.result() for f in futures]
    assert bad.status_code == 400
    plain = {r.choices[0].message.content for r in results[0::2]}
    streamed = {"".join(c.choices[0].delta.content or "" for c in r).strip() for r in results[1::2]}
    assert len(plain) == 1 and plain == streamed


def test_api_key_required_on_v1_only(bundled):
    with BackgroundServer(create_app(Generator(bundled), "m", api_key="s3cret-key")) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in wrong.text
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200


def test_ezo_serve_command_end_to_end(tmp_path):
    """The real `ezo serve` process: the openai client with the right key works, a wrong key gets 401."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EZO_TEST_KEY": "k-123456"}
    log = open(tmp_path / "serve.log", "w")
    # Beyond loopback (all addresses), as a key allows.
    proc = subprocess.Popen([sys.executable, "-m", "ezoforge", "serve", "--model", BUNDLED, "--port", str(port),
                             "--host", "0.0.0.0", "--api-key-env", "EZO_TEST_KEY", "--served-model-name", "ezo-test"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="k-123456", max_retries=0)
        reply = good.chat.completions.create(model="ezo-test", messages=MESSAGES, max_tokens=8)
        assert reply.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        # SIGTERM in the middle of a long generation: it is cancelled and the process exits within seconds.
        stream = good.chat.completions.create(model="ezo-test", messages=MESSAGES, max_tokens=2000,
                                              temperature=0, stream=True)
        next(c for c in stream if c.choices[0].delta.content)
        proc.terminate()
        proc.wait(timeout=15)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit a supervisor expects
        assert proc.returncode == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logged = (tmp_path / "serve.log").read_text()
    assert "k-123456" not in logged
    assert "Application shutdown complete" in logged and "Finished server process" in logged


def test_serve_refuses_unset_key_variable():
    env = {k: v for k, v in os.environ.items() if k != "EZO_UNSET_KEY"}
    proc = subprocess.run([sys.executable, "-m", "ezoforge", "serve", "--api-key-env", "EZO_UNSET_KEY"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "EZO_UNSET_KEY" in proc.stderr


def test_continue_final_message_extends_the_assistant_turn(live_server, client):
    """vLLM's extension: the reply continues a prefilled assistant message instead of opening a new turn."""
    whole = client.chat.completions.create(model=BUNDLED, messages=MESSAGES, max_tokens=16,
                                           temperature=0).choices[0].message.content
    prefill = whole[:6]
    body = {"model": BUNDLED, "messages": MESSAGES + [{"role": "assistant", "content": prefill}], "max_tokens": 6,
            "temperature": 0, "continue_final_message": True, "add_generation_prompt": False}
    resp = httpx.post(f"{live_server}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    rest = resp.json()["choices"][0]["message"]["content"]
    assert rest and (prefill + rest).startswith(whole[: len(prefill) + 2])  # the same greedy text, not a new answer
    streamed = httpx.post(f"{live_server}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    pieces = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces).strip() == rest
    for bad, param in [({**body, "add_generation_prompt": True}, "continue_final_message"),
                       ({k: v for k, v in body.items() if k != "add_generation_prompt"}, "continue_final_message"),
                       ({**body, "messages": MESSAGES}, "messages")]:
        resp = httpx.post(f"{live_server}/v1/chat/completions", json=bad, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
