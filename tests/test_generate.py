import json

import pytest

from ezoforge.cache import answer_key
from ezoforge.errors import RecordError
from ezoforge.infer.chat import repl
from ezoforge.infer.generate import Completion, Generator, Sampling, build_messages, generate_file

SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。"


@pytest.fixture(scope="module")
def gen(bundled):
    return Generator(bundled)


def test_generate_returns_text_with_counts(gen):
    out = gen.complete([build_messages("日本の首都はどこですか？", SYSTEM)], Sampling(max_new_tokens=16))[0]
    assert out.text and out.prompt_tokens > 10 and 0 < out.completion_tokens <= 16
    assert out.finish_reason in ("stop", "length")


def test_left_padded_batch_matches_one_by_one(gen):
    prompts = ["こんにちは", "富士山の高さを教えてください。短く答えて。", "1+1は？"]
    sampling = Sampling(max_new_tokens=10)
    batch = gen.complete([build_messages(p, SYSTEM) for p in prompts], sampling)
    single = [gen.complete([build_messages(p, SYSTEM)], sampling)[0] for p in prompts]
    assert [b.text for b in batch] == [s.text for s in single]
    assert [b.prompt_tokens for b in batch] == [s.prompt_tokens for s in single]


def test_stream_yields_the_same_text_then_totals(gen):
    messages = build_messages("猫について一文で説明してください。", SYSTEM)
    sampling = Sampling(max_new_tokens=20)
    pieces = list(gen.stream(messages, sampling))
    assert isinstance(pieces[-1], Completion)
    assert "".join(pieces[:-1]).strip() == gen.complete([messages], sampling)[0].text
    assert len(pieces) > 3  # really streamed, not one lump


def test_stop_string_cuts_the_reply(gen):
    messages = build_messages("こんにちは", SYSTEM)
    full = gen.complete([messages], Sampling(max_new_tokens=20))[0].text
    stop = full[3:5]
    out = gen.complete([messages], Sampling(max_new_tokens=20, stop=(stop,)))[0]
    assert out.text == full[: full.index(stop)].strip() and out.finish_reason == "stop"
    streamed = "".join(p for p in gen.stream(messages, Sampling(max_new_tokens=20, stop=(stop,))) if isinstance(p, str))
    assert streamed.strip() == out.text


def test_batch_file_resumes_and_keeps_order(gen, tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    rows = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(["こんにちは", "1+1は？", "空は何色？"])]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # A previous run with the same settings that was killed after answering q1 (and tore its last line).
    key = answer_key("m", build_messages("1+1は？", SYSTEM), Sampling(max_new_tokens=8))
    (tmp_path / "answers.jsonl.partial").write_text(json.dumps({"id": "q1", "key": key, "answer": "KEPT"}) +
                                                    '\n{"id": "q2", "ans', encoding="utf-8")
    assert generate_file(gen, src, out, SYSTEM, Sampling(max_new_tokens=8), batch_size=2, identity="m") == 3
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in answers] == ["q0", "q1", "q2"]
    assert answers[1]["answer"] == "KEPT" and answers[0]["answer"] and answers[2]["answer"]
    assert answers[0]["prompt"] == "こんにちは"
    assert not (tmp_path / "answers.jsonl.partial").exists()


def test_batch_file_names_the_bad_line(gen, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        generate_file(gen, src, tmp_path / "out.jsonl", None, Sampling(max_new_tokens=4))
    src.write_text('{"id": 1, "prompt": "a"}\n{broken\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"prompts.jsonl:2: invalid JSON"):
        generate_file(gen, src, tmp_path / "out.jsonl", None, Sampling(max_new_tokens=4))
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_repl_keeps_history_and_obeys_commands(gen):
    lines = iter(["こんにちは", "お元気ですか？", "/system 短く答えて", "/reset", "/nope", "/exit"])
    written = []
    seen_prompts = []
    real_stream = gen.stream

    def recording_stream(messages, sampling):
        seen_prompts.append([m["content"] for m in messages])
        return real_stream(messages, sampling)

    gen.stream = recording_stream
    try:
        repl(gen, SYSTEM, Sampling(max_new_tokens=6), read=lambda _: next(lines), write=written.append)
    finally:
        del gen.stream
    assert seen_prompts[0] == [SYSTEM, "こんにちは"]
    assert seen_prompts[1][:2] == [SYSTEM, "こんにちは"] and seen_prompts[1][-1] == "お元気ですか？"
    assert len(seen_prompts[1]) == 4  # system, user, assistant reply, user
    text = "".join(written)
    assert "system prompt set" in text and "conversation reset" in text and "unknown command /nope" in text
