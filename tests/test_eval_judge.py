import pytest

from ezoforge.errors import ConfigError
from ezoforge.eval.items import OpenTask
from ezoforge.eval.judge_prompt import EMPTY_ANSWER_REASON, PROMPT_VERSION, REASK, judge_answer, judge_messages, parse_verdict
from ezoforge.stages import load_recipe

FENCE = "```"

# Raw judge outputs as models really write them, and what each must become: a grade, or a failure (None).
CASES = [
    ('{"reason": "正確で有用な回答です。", "grade": 5}', 5),
    ('採点結果は以下の通りです。\n{"reason": "指示に従っているが一部誤りがある", "grade": 3}\nよろしくお願いします。', 3),
    (f'{FENCE}json\n{{\n  "reason": "正しい",\n  "grade": 4\n}}\n{FENCE}', 4),
    (f'理由を述べます。\n{FENCE}\n{{"reason": "日本語が不自然", "grade": "2"}}\n{FENCE}', 2),
    ('{"reason": "完璧", "grade": 6}', None),  # out of range: a failure, never clamped to 5
    ('{"reason": "全く駄目", "grade": 0}', None),
    ('{"reason": "微妙", "grade": 3.5}', None),  # not a whole number: never rounded
    ('{"reason": "良い", "grade": 4.0}', 4),
    ('{"reason": "良い", "grade": true}', None),
    ("[[4]]", 4),
    ("この回答は正しいので [[ 5 ]] とします。", 5),
    ("評価: [[2]] …いや [[3]]", None),  # two different bracketed grades: ambiguous
    ("4", 4),
    ("３点", 3),  # full-width digit
    ("", None),
    ("   \n ", None),
    ("この回答はとても良いと思います。", None),  # no grade at all
    ('{"reason": "x", "grade": 2} {"reason": "y", "grade": 5}', None),  # conflicting JSON objects
    ('{"reason": "x", "grade": 4} 補足: {"reason": "x", "grade": 4}', 4),  # repeated but consistent
    ("{'reason': '良い', 'grade': 4}", 4),  # Python-style quotes: the labelled fallback reads it
    ('```json\n{\n  "reason": "途中で切れた', None),  # truncated before any grade
    ("評価：２", 2),
    ("Score: 7", None),
    ('{"reason": "根拠", "評価": 1}', 1),
    ('{"grade": "5点"}', 5),
    ('{"grade": "とても良い"}', None),
    ("I would rate this 3 or maybe 4.", None),
    ('{"reason": "<採点の理由>", "grade": <1〜5の整数>}', None),  # the prompt's format line echoed back
]


@pytest.mark.parametrize("raw,grade", CASES)
def test_parse_verdict(raw, grade):
    verdict = parse_verdict(raw)
    assert verdict.grade == grade
    assert (verdict.error is None) == (grade is not None)


def test_parse_keeps_reason():
    assert parse_verdict('前置き {"reason": "事実誤認が一箇所ある", "grade": 3} 後書き').reason == "事実誤認が一箇所ある"


TASK = OpenTask("elyza100/1", "日本で一番高い山は？", "富士山です。", "- 富士山と答えていなければ1点")


def test_prompt_carries_task_rubric_and_version():
    text = "\n".join(m["content"] for m in judge_messages(TASK, "富士山"))
    for needle in ("日本で一番高い山は？", "富士山です。", "富士山と答えていなければ1点", "過度に慎重", "日本語以外",
                   "不自然な日本語", '"grade"', '"reason"'):
        assert needle in text
    assert PROMPT_VERSION.startswith("ezo-judge-ja-")


class Script:
    """A judge that replies from a list of recorded outputs, logging what it was sent."""

    def __init__(self, *replies):
        self.replies, self.sent = list(replies), []

    def __call__(self, messages):
        self.sent.append(messages)
        return self.replies.pop(0)


def test_empty_answer_scores_one_without_a_judge_call():
    judge = Script()
    verdict = judge_answer(judge, TASK, "  \n", reasks=2)
    assert (verdict.grade, verdict.reason, verdict.error) == (1, EMPTY_ANSWER_REASON, None)
    assert judge.sent == []


def test_reasks_are_bounded_and_then_fail():
    judge = Script("とても良い", "満点です", "5つ星", "[[5]]")
    verdict = judge_answer(judge, TASK, "富士山", reasks=2)
    assert verdict.grade is None and "after 3 requests" in verdict.error
    assert len(judge.sent) == 3 and judge.replies == ["[[5]]"]
    # each re-ask quotes the judge's previous reply and names the problem
    assert judge.sent[1][-2] == {"role": "assistant", "content": "とても良い"}
    assert judge.sent[1][-1]["content"] == REASK.format(problem="no grade found")


def test_reask_recovers():
    judge = Script('{"grade": 9}', '{"reason": "正しい", "grade": 4}')
    verdict = judge_answer(judge, TASK, "富士山", reasks=1)
    assert (verdict.grade, verdict.reason) == (4, "正しい")
    assert "outside 1-5" in judge.sent[1][-1]["content"]


def test_a_cut_json_verdict_keeps_its_reason_not_the_raw_json():
    from ezoforge.eval.judge_prompt import parse_verdict

    verdict = parse_verdict('{"reason": "答えが\\"短い\\"です", "grade": 2')  # no closing brace
    assert (verdict.grade, verdict.reason) == (2, '答えが"短い"です')


@pytest.mark.parametrize("model, sent", [
    ("gpt-4.1-2025-04-14", {"max_tokens": 64, "temperature": 0.7}),
    ("gpt-4o-2024-08-06", {"max_tokens": 64, "temperature": 0.7}),
    ("gpt-5.1-2025-11-13", {"max_completion_tokens": 64}),  # a reasoning model: no sampling settings
    ("o3-2025-04-16", {"max_completion_tokens": 64}),
    ("gpt-5-chat-latest", {"max_tokens": 64, "temperature": 0.7}),
])
def test_each_judge_gets_the_request_fields_it_takes(model, sent):
    from ezoforge.remote import chat, make_client
    from scripted_judge import ScriptedJudge

    with ScriptedJudge(lambda messages: "ok") as judge:
        reply = chat(make_client(judge.url), model, [{"role": "user", "content": "採点してください"}], 64,
                     temperature=0.7, seed=2)
    body = judge.requests[-1]
    fields = {"max_tokens", "max_completion_tokens", "temperature", "top_p"}
    assert reply.text == "ok" and body["seed"] == 2
    assert {k: v for k, v in body.items() if k in fields - {"top_p"}} == sent
    assert ("top_p" in body) == ("temperature" in sent)


def test_a_judge_with_only_its_default_temperature_samples_at_1_or_is_refused():
    base = ["eval.judge_url=https://api.openai.com/v1", "eval.judge_model=gpt-5.1-2025-11-13"]
    cfg = load_recipe(None, [*base, "eval.judgments=3"]).eval
    assert cfg.judge_temperature == 1.0 and cfg.judgments == 3  # its repeated verdicts differ
    with pytest.raises(ConfigError, match=r"judge_temperature=0.7, but gpt-5.1-2025-11-13 takes only its default"):
        load_recipe(None, [*base, "eval.judge_temperature=0.7"])
    assert load_recipe(None, [*base[:1], "eval.judge_model=gpt-4.1-2025-04-14"]).eval.judge_temperature == 0.0


@pytest.mark.parametrize(("answer", "share"), [
    ("The capital of Japan is Tokyo.", 0.0),
    ("日本の首都は東京です。", 1.0),
    ("日本の首都は Tokyo です。", 8 / 13),  # 8 kana and kanji of 13 letters: between
    ("", 0.0),
])
def test_the_japanese_share_of_an_answer(answer, share):
    from ezoforge.text import japanese_ratio

    assert japanese_ratio(answer) == pytest.approx(share)


def test_an_eval_reports_the_share_of_answers_mainly_in_japanese():
    from ezoforge.eval.task_types.judged import JAPANESE_ANSWERS, MAINLY_JAPANESE, japanese_answers
    from ezoforge.eval.tasks import METRICS

    assert japanese_answers(["日本の首都は東京です。", "The capital is Tokyo.", "東京 is the capital です"]) == \
        pytest.approx(1 / 3, abs=1e-4)  # the mixed one is 4 of 16 letters kana or kanji: below MAINLY_JAPANESE
    assert MAINLY_JAPANESE == 0.5 and japanese_answers([]) is None
    assert METRICS["japanese_answers"] is JAPANESE_ANSWERS  # so every report, compare and the card show it
