"""Parsers and pair filters on real-looking model outputs; passage splitting."""
import pytest

from ezoforge.synth import prompts
from ezoforge.synth.parse import PairFilter, parse_prompted, parse_synthesizer
from ezoforge.synth.passages import sentences, split
from ezoforge.synth.settings import PairFilters
from ezoforge.text import japanese_ratio

# ---------------------------------------------------------------- synthesizer format

SYNTH_CASES = {
    "well_formed": (
        "<QUE> 梅雨はどの地域でみられますか。 <ANS> 本州や九州など、日本の広い地域です。 </END>\n\n"
        "<QUE> What is the rainy season called in Japan? <ANS> Tsuyu. </END>",
        [("梅雨はどの地域でみられますか。", "本州や九州など、日本の広い地域です。"),
         ("What is the rainy season called in Japan?", "Tsuyu.")], []),
    "unterminated_tail": (
        "<QUE> 入梅とは何ですか。 <ANS> 梅雨の時期が始まることです。 </END>\n\n<QUE> 出梅とは <ANS> 梅雨が終わ",
        [("入梅とは何ですか。", "梅雨の時期が始まることです。")], ["unterminated"]),
    "doubled_ans": (
        "<QUE> 梅雨の期間は？ <ANS> 1か月半 <ANS> 2か月 </END>\n\n<QUE> 雨季とは？ <ANS> 雨の多い季節です。 </END>",
        [("雨季とは？", "雨の多い季節です。")], ["ans_count"]),
    "empty_answer": ("<QUE> 梅雨前線とは何ですか。 <ANS>   </END>", [], ["empty_answer"]),
    "repeated_question": (
        "<QUE> What causes Baiu? <ANS> A front. </END>\n\n<QUE> what causes baiu? <ANS> Air masses. </END>",
        [("What causes Baiu?", "A front.")], ["repeated_question"]),
    "no_que": ("梅雨とは？ <ANS> 雨の多い期間。 </END>", [], ["no_que"]),
    "nothing": ("", [], []),
}


@pytest.mark.parametrize("name", SYNTH_CASES)
def test_synthesizer_parser(name):
    text, pairs, reasons = SYNTH_CASES[name]
    parsed = parse_synthesizer(text)
    assert parsed.pairs == pairs
    assert [r for r, _ in parsed.dropped] == reasons


def test_synthesizer_prompt_is_the_upstream_format():
    req = prompts.synthesizer("d1", "本文。")
    assert req.prompt == "<s> <CON> 本文。 </CON>\n\n" and req.messages is None


# ---------------------------------------------------------------- prompted format

PROMPTED_CASES = {
    "well_formed": (
        "質問1: この文章を一文で要約してください。\n回答1: 梅雨は初夏に雨の日が続く季節です。\n"
        "質問2: 梅雨はいつですか。\n回答2: 5月から7月にかけてです。\n質問3: 雨季とは何ですか。\n回答3: 雨の多い季節です。",
        False, [("この文章を一文で要約してください。", "梅雨は初夏に雨の日が続く季節です。"),
                ("梅雨はいつですか。", "5月から7月にかけてです。"), ("雨季とは何ですか。", "雨の多い季節です。")], []),
    "near_miss_markers": (  # bold, bullets, full-width digits and colons, another word for "answer"
        "**質問１：** 入梅とは何ですか。\n**答え１：** 梅雨の時期が始まることです。\n- 質問2: 出梅とは？\n- 回答2: 梅雨が終わることです。",
        False, [("入梅とは何ですか。", "梅雨の時期が始まることです。"), ("出梅とは？", "梅雨が終わることです。")], []),
    "same_line": (
        "質問1: 梅雨は何の一種ですか？ 回答1: 雨季の一種です。質問2: 梅雨はどこでみられますか。回答2: 東アジアです。",
        False, [("梅雨は何の一種ですか？", "雨季の一種です。"), ("梅雨はどこでみられますか。", "東アジアです。")], []),
    "latin_markers": (
        "Q1: 梅雨前線とは何ですか。\nA1: 停滞前線の一つです。\nQ2: ビタミンA: とは？\nA2: 栄養素です。",
        False, [("梅雨前線とは何ですか。", "停滞前線の一つです。"), ("ビタミンA: とは？", "栄養素です。")], []),
    "truncated_cut_back": (
        "質問1: 梅雨の特徴は？\n回答1: 曇りや雨が多い。湿度も高く、カビが生え", True,
        [("梅雨の特徴は？", "曇りや雨が多い。")], []),
    "truncated_no_sentence": (
        "質問1: 梅雨の特徴は？\n回答1: 曇りや雨が多く湿度も高いため、カビが生え", True, [], ["truncated"]),
    "question_without_answer": (
        "質問1: 梅雨とは何ですか。\n質問2: 入梅とは何ですか。\n回答2: 梅雨入りのことです。", False,
        [("入梅とは何ですか。", "梅雨入りのことです。")], ["no_answer"]),
    "more_than_asked": (
        "質問1: 一つ目？\n回答1: はい。\n質問2: 二つ目？\n回答2: はい。\n質問3: 三つ目？\n回答3: はい。", False,
        [("一つ目？", "はい。"), ("二つ目？", "はい。")], []),
    "blank_line_ends_answer": (
        "質問1: 梅雨は何月ですか。\n回答1: 5月から7月です。\n\n文章:\n梅雨（つゆ）は……", False,
        [("梅雨は何月ですか。", "5月から7月です。")], []),
    "passage_label_ends_answer": (
        "質問1: この文章を一文で要約してください。\n回答1:文章1: 同じごろ、高気圧が勢力を増す。\n"
        "質問2: 梅雨の期間は？\n回答2: 1. 梅雨の期間はふつう1か月半程度である。", False,
        [("梅雨の期間は？", "梅雨の期間はふつう1か月半程度である。")], ["empty_answer"]),
    "no_markers": ("梅雨は、初夏に日本の広い地域で続く長雨の季節", False, [], ["no_markers"]),
}


@pytest.mark.parametrize("name", PROMPTED_CASES)
def test_prompted_parser(name):
    text, truncated, pairs, reasons = PROMPTED_CASES[name]
    parsed = parse_prompted(text, 2 if name == "more_than_asked" else 3, truncated)
    assert parsed.pairs == pairs
    assert [r for r, _ in parsed.dropped] == reasons


def test_prompted_request_prefills_the_first_pair():
    req = prompts.prompted("d1", "梅雨は雨季の一種である。", 3, system="システム")
    roles = [r for r, _ in req.messages]
    assert roles == ["system", "user", "assistant", "user"]  # its system message, one worked example, the passage
    assert req.messages[0] == ("system", "システム")
    assert "梅雨は雨季の一種である。" in req.messages[-1][1]
    assert req.prefill.startswith("質問1: ") and req.prefill.endswith("回答1:")
    assert req.prefill.split("\n")[0][len("質問1: "):] in prompts.SEED_INSTRUCTIONS
    # the example itself parses into the pairs we wrote
    assert parse_prompted(req.messages[2][1], 3).pairs == list(prompts.EXAMPLE_PAIRS[:3])


# ---------------------------------------------------------------- filters

PASSAGE = "梅雨は、初夏に雨やくもりの日が続く季節のこと。長雨の季節ともいう。"
FILTER_CASES = [
    ("梅雨とは何ですか。", "初夏に雨やくもりの日が続く季節です。", None),
    ("", "答え", "empty"),
    ("何？", "雨季です。", "instruction_length"),
    ("梅雨とは何ですか。", "x" * 2001, "response_length"),
    ("What is tsuyu?", "It is the rainy season.", "not_japanese"),
    ("梅雨とは何ですか。", "Rainy season", "not_japanese"),
    ("和紙の主な原料は何ですか。", "コウゾの繊維です。", "copies_example"),
    ("この文章の要点を説明してください。", "説明してください。", "answer_repeats_question"),
    ("この文章を書き写してください。", PASSAGE, "copies_passage"),
    # the bundled 135M model stuck in a loop (a real output)
    ("この文章から読み取れる事実を一つ挙げてください。",
     "1993年、1993年のスコートラスコンテムでは、1993年のスコートラスコンテムでは、1993年のスコートラスコンテムでは、",
     "repetitive"),
    # a list with a parallel ending is not a loop
    ("梅雨の過ごし方を三つ挙げてください。",
     "1. 部屋の除湿をすること。\n2. 傘を持ち歩くこと。\n3. 雨の日の趣味を見つけること。", None),
]


@pytest.mark.parametrize("instruction,response,reason", FILTER_CASES)
def test_pair_filter(instruction, response, reason):
    assert PairFilter(PairFilters()).check(instruction, response, PASSAGE) == reason


def test_duplicate_instruction_within_a_document_only():
    f = PairFilter(PairFilters())
    assert f.check("梅雨とは何ですか。", "雨の多い期間です。", PASSAGE) is None
    assert f.check("梅雨とは何ですか？", "雨季の一種です。", PASSAGE) == "duplicate_instruction"  # punctuation aside
    f.new_document()
    assert f.check("梅雨とは何ですか。", "雨の多い期間です。", PASSAGE) is None


def test_japanese_ratio_ignores_digits_and_punctuation():
    assert japanese_ratio("5月から7月、1945年。") == 1.0
    assert japanese_ratio("DNAとは何ですか") == pytest.approx(6 / 9)
    assert japanese_ratio("123") == 0.0


# ---------------------------------------------------------------- passages

def test_sentences_split_on_japanese_boundaries():
    assert sentences("梅雨は雨季である。「本当？」と聞いた！\n次の行") == ["梅雨は雨季である。", "「本当？」", "と聞いた！\n", "次の行"]


def test_split_packs_sentences_under_the_budget():
    text = "あいうえお。" * 10 + "か" * 25 + "。"
    passages = split(text, 14, len)
    assert all(len(p) <= 14 for p in passages)
    assert passages[0] == "あいうえお。あいうえお。"  # whole sentences while they fit
    assert "".join(passages) == text  # nothing lost; the long sentence is cut into pieces that fit
    assert split("短い。", 100, len) == ["短い。"]
