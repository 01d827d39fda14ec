"""A scripted OpenAI-compatible judge on loopback: known verdicts, so every assertion about grades is exact.

`with ScriptedJudge() as judge:` serves `POST {judge.url}/chat/completions` (the url ends in /v1) from a thread;
each request body is appended to `judge.requests`. The reply text comes from `script(messages) -> str`; the default grades an
answer by its length (`expected_grade`), which a test recomputes from answers.jsonl, and `judge_and_synthesizer` names
the longer of two answers in a pairwise prompt (`expected_winner`). `judge_and_synthesizer` also
answers synth's prompted requests, and `/completions` answers synthesizer-mode prompts (`synthesizer_pairs`), so a
pipeline test can synthesize pairs in milliseconds.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "scripted-judge-2026-12-01"
FINGERPRINT = "fp_scripted_0001"
_ANSWER = re.compile(r"# アシスタントの回答\n(.*)\n\n# 採点方法", re.S)
_PASSAGE = re.compile(r"^文章:\n(.*?)\n\n", re.S)


def expected_grade(answer: str) -> int:
    """The default script's grade; an empty answer gets 1, as the judge gives it without a request."""
    return 1 + len(answer.strip()) % 5


def answer_of(messages: list[dict]) -> str:
    """The assistant's answer quoted in a judge prompt (ezoforge.eval.judge_prompt.TEMPLATE)."""
    found = _ANSWER.search(messages[1]["content"])
    assert found, "not a judge prompt"
    return found.group(1)


def by_length(messages: list[dict]) -> str:
    answer = answer_of(messages)
    return json.dumps({"reason": f"{len(answer.strip())} 文字", "grade": expected_grade(answer)}, ensure_ascii=False)


def first_sentence(messages: list[dict]) -> str:
    """A prompted synth request (ezoforge.synth.prompts.prompted) is continued after its prefill `…回答1:` with the
    passage's first sentence: an answer the pair filters keep."""
    found = _PASSAGE.search(messages[-2]["content"])
    assert found and messages[-1]["role"] == "assistant", "not a prompted synth request"
    sentence = re.match(r".+?[。！？]", found.group(1).strip(), re.S)
    return " " + (sentence.group(0) if sentence else found.group(1).strip()[:60])


_CONTEXT = re.compile(r"<CON>(.*?)</CON>", re.S)


def synthesizer_pairs(prompt: str) -> str:
    """An Instruction Pre-Training synthesizer reply (synth.prompts.synthesizer's completion prompt): one pair per
    sentence of the passage, up to five, each answered with its sentence."""
    found = _CONTEXT.search(prompt)
    assert found, "not a synthesizer prompt"
    sentences = re.findall(r".+?[。！？]", found.group(1).strip(), re.S)[:5] or [found.group(1).strip()[:60]]
    return "".join(f"<QUE> この文章の{i}番目の文は何を述べていますか。 <ANS> {s.strip()} </END>"
                   for i, s in enumerate(sentences, 1))


_PAIR = re.compile(r"# アシスタント([AB])の回答\n(.*?)(?=\n\n#)", re.S)


def expected_winner(a: str, b: str) -> str:
    """The default pairwise verdict: the longer answer wins, equal lengths tie."""
    return "tie" if len(a.strip()) == len(b.strip()) else "A" if len(a.strip()) > len(b.strip()) else "B"


def longer_wins(messages: list[dict]) -> str:
    """A pairwise prompt (ezoforge.eval.pairwise.TEMPLATE) answered by expected_winner."""
    answers = dict(_PAIR.findall(messages[1]["content"]))
    assert set(answers) == {"A", "B"}, "not a pairwise prompt"
    return json.dumps({"reason": "長さで比較", "winner": expected_winner(answers["A"], answers["B"])},
                      ensure_ascii=False)


def judge_and_synthesizer(messages: list[dict]) -> str:
    if _PASSAGE.search(messages[-2]["content"] if len(messages) > 1 else ""):
        return first_sentence(messages)
    return longer_wins(messages) if _PAIR.search(messages[1]["content"]) else by_length(messages)


class ScriptedJudge:
    def __init__(self, script: Callable[[list[dict]], str] = by_length, model: str = MODEL,
                 fingerprint: str = FINGERPRINT, complete: Callable[[str], str] = synthesizer_pairs):
        self.script, self.model, self.fingerprint, self.complete = script, model, fingerprint, complete
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                if self.path == "/v1/completions":  # a completion prompt (synth's synthesizer mode)
                    try:
                        text = judge.complete(body["prompt"])
                    except Exception as e:
                        return self._send(400, {"error": {"message": f"scripted judge: {e!r}"}})
                    return self._send(200, {"id": f"cmpl-{len(judge.requests)}", "object": "text_completion",
                                            "created": 0, "model": judge.model,
                                            "choices": [{"index": 0, "finish_reason": "stop", "text": text}],
                                            "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                      "total_tokens": 2}})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    text = judge.script(body["messages"])
                except Exception as e:  # a script that does not fit the request: a clear 400, never retried
                    return self._send(400, {"error": {"message": f"scripted judge: {e!r}"}})
                self._send(200, {"id": f"chatcmpl-{len(judge.requests)}", "object": "chat.completion", "created": 0,
                                 "model": judge.model, "system_fingerprint": judge.fingerprint,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> ScriptedJudge:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer_length(prompt: str, completion: str) -> float:
    """A user's own reward, as a recipe names one (`scripted_judge:answer_length`): longer answers score higher."""
    return min(1.0, len(completion) / 20)
