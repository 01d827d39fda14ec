"""The continuous-batching loop behind `ezo serve`, driven directly, and whole characters on every generation path."""
import json
import queue
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ezoforge.config import ServeConfig
from ezoforge.infer.batching import Batcher
from ezoforge.infer.generate import Completion, Generator, Sampling, TextSoFar, build_messages, whole_chars

PROMPTS = ["日本の首都はどこですか？", "猫について一文で説明してください。", "富士山の高さを教えてください。",
           "こんにちは", "1+1は？", "空は何色？"]
SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"


@pytest.fixture(scope="module")
def gen(bundled):
    return Generator(bundled)


@pytest.fixture(scope="module")
def batcher(gen):
    b = Batcher(gen, ServeConfig(max_batch=16, max_queue=64))
    yield b
    b.close()


def submit(batcher, gen, prompt, sampling):
    events = queue.SimpleQueue()
    job = batcher.submit(gen.encode(gen.prompt_text(build_messages(prompt, SYSTEM))), sampling, events.put)
    return job, events


def drain(events) -> tuple[list[str], Completion]:
    pieces = []
    while isinstance(event := events.get(timeout=600), str):
        pieces.append(event)
    assert isinstance(event, Completion), event
    return pieces, event


GREEDY_24 = Sampling(max_new_tokens=24)


@pytest.fixture(scope="module")
def alone(batcher, gen):
    """Each prompt's greedy reply through the batching loop, one request at a time."""
    replies = [drain(submit(batcher, gen, p, GREEDY_24)[1])[1] for p in PROMPTS]
    reference = gen.complete([build_messages(p, SYSTEM) for p in PROMPTS[:1]], GREEDY_24)[0]
    assert replies[0].text == reference.text  # the loop decodes what generate() decodes
    return replies


@pytest.mark.parametrize("prefill_tokens", [4096, 1])
def test_greedy_output_is_the_same_alone_or_in_a_batch(gen, alone, prefill_tokens):
    """Up to padding effects: float sums over padded rows may flip a near-tie late in a reply, never early.
    With a prefill budget of 1 token the joining requests are prefilled one by one and then stacked."""
    batcher = Batcher(gen, ServeConfig(max_batch=16, max_prefill_tokens=prefill_tokens))
    together = [drain(events)[1] for _, events in [submit(batcher, gen, p, GREEDY_24) for p in PROMPTS]]
    batcher.close()
    same = sum(a.text == t.text for a, t in zip(alone, together))
    assert same >= len(PROMPTS) - 1, [(a.text, t.text) for a, t in zip(alone, together)]
    for a, t in zip(alone, together):
        n = next((i for i, (x, y) in enumerate(zip(a.text, t.text)) if x != y), min(len(a.text), len(t.text)))
        assert n >= min(8, len(a.text), len(t.text))
        assert a.completion_tokens == t.completion_tokens or a.text != t.text


def test_a_request_joins_a_running_batch_and_streams(gen, batcher):
    long, long_events = submit(batcher, gen, PROMPTS[1], Sampling(max_new_tokens=60))
    first = long_events.get(timeout=600)
    assert isinstance(first, str)
    _, late_events = submit(batcher, gen, PROMPTS[2], Sampling(max_new_tokens=6))
    late_pieces, late_done = drain(late_events)
    # The late request finished while the long one was still generating: it joined at a step boundary.
    assert late_done.completion_tokens <= 6 and "".join(late_pieces).strip() == late_done.text
    long_pieces, long_done = drain(long_events)
    assert long_done.completion_tokens > 6 and (first + "".join(long_pieces)).strip() == long_done.text


def test_cancelled_request_leaves_and_the_others_go_on(gen, batcher):
    sampling = Sampling(max_new_tokens=12)
    expected = drain(submit(batcher, gen, PROMPTS[3], sampling)[1])[1].text
    doomed, doomed_events = submit(batcher, gen, PROMPTS[0], Sampling(max_new_tokens=400))
    _, other_events = submit(batcher, gen, PROMPTS[3], sampling)
    assert isinstance(doomed_events.get(timeout=600), str)
    doomed.cancel()
    assert drain(other_events)[1].text == expected
    # The doomed request stopped at a step boundary: it never completes, and the loop goes idle.
    after = [doomed_events.get_nowait() for _ in range(doomed_events.qsize())]
    assert not any(isinstance(e, Completion) for e in after) and len(after) < 400
    drain(submit(batcher, gen, PROMPTS[4], Sampling(max_new_tokens=2))[1])
    assert doomed_events.empty()


def test_seeded_sampling_is_reproducible_in_a_batch(gen, batcher):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = drain(submit(batcher, gen, PROMPTS[0], sampling)[1])[1].text
    crowd = [submit(batcher, gen, p, sampling)[1] for p in PROMPTS[:3]]
    assert drain(crowd[0])[1].text == alone
    for events in crowd[1:]:
        drain(events)


# ---------------------------------------------------------------- whole characters

JA_PROMPTS = ["日本の伝統的な料理について説明してください。", "東京の有名な観光地を教えてください。"]
LIMITS = range(1, 41)


def test_text_so_far_holds_back_a_cut_character_and_keeps_a_real_one(gen):
    ids = gen.encode("猫です")
    pieces = []
    so_far = TextSoFar(gen.decode, ())
    for token_id in ids:
        pieces.append(so_far.add(token_id))
    pieces.append(so_far.finish())
    assert "".join(pieces) == "猫です" and "\ufffd" not in "".join(pieces)
    assert whole_chars("A\ufffdB") == "A\ufffdB" and whole_chars("AB\ufffd") == "AB"
    real = TextSoFar(gen.decode, ())
    text = "".join(real.add(t) for t in gen.encode("置換文字\ufffdを含む")) + real.finish()
    assert text == "置換文字\ufffdを含む"  # U+FFFD the text really holds stays


@pytest.mark.slow  # ~5 minutes on 2 CPU cores: 40 lengths through four paths
def test_cut_characters_exist_and_never_leave_any_path(gen, live_server):
    """The bundled model on Japanese prompts, every max_new_tokens 1..40: batch, stream, serve plain and stream."""
    messages = [build_messages(p, SYSTEM) for p in JA_PROMPTS]
    # The hazard is real: some cut of these greedy replies ends inside a character.
    enc = gen._encode([gen.prompt_text(m) for m in messages])
    import torch

    with torch.inference_mode():
        out = gen.model.generate(**enc, **gen._generate_kwargs(Sampling(max_new_tokens=40)))
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    assert any(gen.tokenizer.decode(r[:n], skip_special_tokens=True).endswith("\ufffd") for r in rows for n in LIMITS)
    broken = []
    for n in LIMITS:
        for c in gen.complete(messages, Sampling(max_new_tokens=n)):
            broken += [("batch", n, c.text)] if "\ufffd" in c.text else []
    for n in LIMITS:
        pieces = list(gen.stream(messages[0], Sampling(max_new_tokens=n)))
        text = "".join(p for p in pieces if isinstance(p, str))
        broken += [("stream", n, text)] if "\ufffd" in text + pieces[-1].text else []

    def ask(args):
        n, prompt, stream = args
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0, "stream": stream}
        resp = httpx.post(f"{live_server}/v1/chat/completions", json=body, timeout=600)
        assert resp.status_code == 200, resp.text
        if not stream:
            return ("serve", n, resp.json()["choices"][0]["message"]["content"])
        chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
        return ("serve stream", n, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, [(n, p, s) for n in LIMITS for p in JA_PROMPTS[:1] for s in (False, True)]))
    broken += [r for r in replies if "\ufffd" in r[2]]
    assert not broken, broken[:5]
