import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED
from ezoforge.config import DEFAULT_SYSTEM_PROMPT
from ezoforge.errors import RecordError
from ezoforge.models import load_tokenizer
from ezoforge.records import read_rows
from ezoforge.train.data import PackedCollator, pack, prepare, read_conversations, split_eval
from ezoforge.turns import IGNORE, encode, end_of_turn_id
from trainkit import assert_packed_rows_stay_apart, elyza_rows, passage_pairs, tiny_model  # noqa: F401  (fixtures)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVO = [{"role": "system", "content": "あなたは誠実なアシスタントです。"},
         {"role": "user", "content": "日本の首都は？"},
         {"role": "assistant", "content": "東京です。"},
         {"role": "user", "content": "では大阪は？"},
         {"role": "assistant", "content": "大阪府の府庁所在地です。"}]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="module")
def llama3():
    """The real Llama 3 tokenizer (llama-models' tiktoken file) as a transformers tokenizer with its chat format."""
    import llama_models.llama3.tokenizer as lt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = lt.Tokenizer.get_instance()
    backend = TikTokenConverter(vocab_file=str(Path(lt.__file__).parent / "tokenizer.model"), pattern=meta.pat_str,
                                extra_special_tokens=meta.special_tokens).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                  eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def trained_pieces(tok, enc):
    """The labelled tokens, grouped into contiguous runs and decoded."""
    runs, current = [], []
    for tid, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE:
            assert lab == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def test_labels_cover_assistant_turns_and_their_end_token_on_smollm2(smol):
    assert smol.pad_token_id == smol.eos_token_id  # the trap: masking pad ids would drop <|im_end|>
    enc = encode(smol, CONVO)
    assert trained_pieces(smol, enc) == ["東京です。<|im_end|>", "大阪府の府庁所在地です。<|im_end|>"]
    assert end_of_turn_id(smol) == smol.convert_tokens_to_ids("<|im_end|>")


def test_labels_include_eot_on_the_llama3_template(llama3):
    enc = encode(llama3, CONVO)
    assert trained_pieces(llama3, enc) == ["東京です。<|eot_id|>", "大阪府の府庁所在地です。<|eot_id|>"]
    # A base Llama 3 tokenizer's eos is <|end_of_text|>; the turn still ends (and is trained to end) on <|eot_id|>.
    assert end_of_turn_id(llama3) == llama3.convert_tokens_to_ids("<|eot_id|>") != llama3.eos_token_id


@pytest.mark.parametrize("context_loss, pieces", [
    (False, ["短く言うと、梅雨は雨季です。<|im_end|>"]),
    (True, ["梅雨は東アジアの雨季である。", "短く言うと、梅雨は雨季です。<|im_end|>"]),
])
def test_context_loss_adds_the_passage_and_nothing_else(smol, context_loss, pieces):
    convo = [{"role": "system", "content": "SYS"},
             {"role": "user", "content": "梅雨は東アジアの雨季である。\n\n要約して", "context": "梅雨は東アジアの雨季である。"},
             {"role": "assistant", "content": "短く言うと、梅雨は雨季です。"}]
    assert trained_pieces(smol, encode(smol, convo, context_loss=context_loss)) == pieces


def test_rows_become_messages_with_system_prompt_and_context(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": "要約して", "response": "短い要約", "context": "長い文章。"},
            {"instruction": "挨拶して", "response": "こんにちは"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    convos = read_conversations([path], "SYS")
    assert convos[0] == [{"role": "system", "content": "SYS"},
                         {"role": "user", "content": "長い文章。\n\n要約して", "context": "長い文章。",
                          "instruction": "要約して"},
                         {"role": "assistant", "content": "短い要約"}]
    assert convos[1][1] == {"role": "user", "content": "挨拶して"}
    assert convos[2][0] == {"role": "system", "content": "SYS"}
    assert convos[3][0] == {"role": "system", "content": "own"}
    assert read_conversations([path], None)[1][0]["role"] == "user"


def test_a_synth_folder_is_read_from_its_parquet_shards_once_finished(tmp_path):
    from ezoforge.records import write_parquet
    from ezoforge.stage import Stage

    folder = tmp_path / "synth"
    write_parquet(folder / "data" / "part-00000.parquet", [
        {"id": "p1", "doc_id": "d1", "instruction": "何の話？", "response": "和紙です。", "context": "和紙の文章。",
         "generator": "g"},
        {"id": "p2", "doc_id": "d1", "instruction": "挨拶して", "response": "どうも。", "context": None, "generator": "g"}])
    with pytest.raises(RecordError, match="not finished"):
        read_conversations([folder], None)
    Stage("synth", folder, {}).finish({})
    convos = read_conversations([folder], None)
    assert [c[0]["content"] for c in convos] == ["和紙の文章。\n\n何の話？", "挨拶して"]


def test_train_stats_count_pairs_by_source(smol, tmp_path):
    from ezoforge.records import write_parquet
    from ezoforge.stage import Stage

    folder = tmp_path / "synth"
    write_parquet(folder / "data" / "part-00000.parquet", [
        {"id": f"p{i}", "doc_id": f"d{i}", "instruction": "何の話？", "response": "和紙です。", "context": None,
         "generator": "g", "source": source} for i, source in enumerate(["wikipedia", "fineweb", "wikipedia"])])
    Stage("synth", folder, {}).finish({})
    own = tmp_path / "own.jsonl"  # a user's file without sources: used, not counted
    own.write_text(json.dumps({"instruction": "挨拶して", "response": "どうも。"}, ensure_ascii=False) + "\n")
    stats = prepare(smol, [folder, own], None, 256, True, 0.0, 0).stats
    assert stats["examples"] == 4 and stats["pairs_by_source"] == {"fineweb": 1, "wikipedia": 2}
    assert "pairs_by_source" not in prepare(smol, [own], None, 256, True, 0.0, 0).stats


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x"}, r"rows.jsonl:2: missing field 'response'"),
    ({"instruction": "x", "response": 3}, r"rows.jsonl:2: field 'response' must be str"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"rows.jsonl:2: field 'messages\[0\]'"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"rows.jsonl:2: .*no assistant turn"),
])
def test_bad_rows_are_named_by_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=message):
        read_conversations([path], None)


def test_packing_keeps_every_example_once_within_the_budget(smol, elyza_rows):
    prepared = prepare(smol, [elyza_rows], "SYS", 1024, True, 0.2, 0)
    rows, stats = prepared.train, prepared.stats
    assert all(len(r["input_ids"]) == sum(r["seq_lengths"]) <= 1024 for r in rows)
    assert sum(len(r["seq_lengths"]) for r in rows) == stats["examples"]
    assert sum(len(r["input_ids"]) for r in rows) == stats["train_tokens"]
    assert len(rows) < stats["examples"] and 0.8 < stats["packing_efficiency"] <= 1.0
    assert stats["eval_examples"] == 3 and stats["examples"] + stats["eval_examples"] == 14
    assert pack([], 1024, packing=True) == []  # no held-out slice
    unpacked = prepare(smol, [elyza_rows], "SYS", 1024, False, 0.2, 0)
    assert len(unpacked.train) == stats["examples"] and unpacked.stats["packing_efficiency"] < 0.6


# ---------------------------------------------------------------- a passage's pairs in one conversation

def labelled_runs(row) -> list[tuple[int, ...]]:
    """The token ids of each contiguous labelled run of a row: an answer (through its end-of-turn token), or a
    passage under context_loss."""
    runs, current = [], []
    for tid, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE:
            current.append(tid)
        elif current:
            runs.append(tuple(current))
            current = []
    return runs + [tuple(current)] if current else runs


def passages_of(folder) -> list[str]:
    return list(dict.fromkeys(row["context"] for path in sorted((folder / "data").iterdir())
                              for _, row in read_rows(path) if row["context"]))


def grouped_and_single(smol, folder, max_length, eval_fraction=0.0, context_loss=False):
    """The same pairs prepared unpacked with group_pairs passage, then none."""
    return [prepare(smol, [folder], DEFAULT_SYSTEM_PROMPT, max_length, False, eval_fraction, 0, context_loss, mode)
            for mode in ("passage", "none")]


@pytest.mark.parametrize("max_length", [4096, 1024])  # every passage's pairs in one conversation; split in two or more
def test_grouping_labels_exactly_the_answers_that_one_pair_per_conversation_does(smol, passage_pairs, max_length):
    grouped, single = grouped_and_single(smol, passage_pairs, max_length)
    answers = [run for row in single.train for run in labelled_runs(row)]
    assert len(answers) == single.stats["pairs"] == single.stats["examples"] == 42
    # The same token ids for every answer, in synth's order; none is cut or lost.
    assert [run for row in grouped.train for run in labelled_runs(row)] == answers
    assert grouped.stats["pairs"] == 42 and grouped.stats["truncated"] == single.stats["truncated"] == 0
    assert grouped.stats["trained_tokens"] == single.stats["trained_tokens"]


def test_a_passage_is_read_once_not_once_per_pair(smol, passage_pairs):
    rows = [row for _, row in read_rows(passage_pairs / "data" / "part-00000.parquet")]
    per_passage = Counter(row["context"] for row in rows if row["context"])
    assert len(per_passage) == 8 and min(per_passage.values()) >= 4
    grouped, single = (p.stats for p in grouped_and_single(smol, passage_pairs, 4096))
    assert grouped["examples"] == 8 + 2  # one conversation per passage; the pairs without one train alone
    assert grouped["train_tokens"] * 3 <= single["train_tokens"]
    assert grouped["train_tokens_ungrouped"] == single["train_tokens_ungrouped"] == single["train_tokens"]


def test_a_passage_too_long_for_one_conversation_is_split_each_part_starting_with_it(smol, passage_pairs):
    passages = passages_of(passage_pairs)
    grouped, single = grouped_and_single(smol, passage_pairs, 1024)
    assert 10 < grouped.stats["examples"] < 42 and grouped.stats["truncated"] == 0
    with_passage = 0
    for row in grouped.train:
        assert len(row["input_ids"]) <= 1024
        text = smol.decode(row["input_ids"])
        found = [p for p in passages if p in text]
        if found:
            with_passage += 1
            first_user = text.split("<|im_start|>user\n", 1)[1]
            assert len(found) == 1 and first_user.startswith(found[0] + "\n\n") and text.count(found[0]) == 1
    assert with_passage == grouped.stats["examples"] - 2
    # Below one pair with its passage every pair is alone and cut at max_length, exactly as without grouping.
    tight, tight_single = grouped_and_single(smol, passage_pairs, 700)
    assert tight.stats["truncated"] > 0 and tight.train == tight_single.train


def test_context_loss_learns_each_passage_once_per_conversation(smol, passage_pairs):
    passages = passages_of(passage_pairs)
    answers, _ = grouped_and_single(smol, passage_pairs, 1024)
    for prepared in grouped_and_single(smol, passage_pairs, 1024, context_loss=True):
        extra = (Counter(run for row in prepared.train for run in labelled_runs(row))
                 - Counter(run for row in answers.train for run in labelled_runs(row)))
        assert sum(extra.values()) == prepared.stats["examples"] - 2  # each conversation with a passage learns it once
        assert {smol.decode(run) for run in extra} == set(passages)


def test_the_held_out_split_keeps_each_passage_on_one_side(smol, passage_pairs):
    passages = passages_of(passage_pairs)

    def passages_in(rows):  # their numbers
        return {i for row in rows for i, p in enumerate(passages) if p in smol.decode(row["input_ids"])}

    splits = grouped_and_single(smol, passage_pairs, 1024, eval_fraction=0.5)
    for prepared in splits:
        train, held = passages_in(prepared.train), passages_in(prepared.eval)
        assert held and train and not train & held and train | held == set(range(len(passages)))
    assert passages_in(splits[0].eval) == passages_in(splits[1].eval)  # both modes hold out the same passages
    again = grouped_and_single(smol, passage_pairs, 1024, eval_fraction=0.5)
    assert [p.eval for p in again] == [p.eval for p in splits]  # seeded


def test_eval_split_is_seeded_and_disjoint():
    items = list(range(40))
    train, held = split_eval(items, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == items
    assert split_eval(items, 0.1, seed=3) == (train, held) and split_eval(items, 0.1, seed=4)[1] != held
    assert split_eval(items, 0.0, seed=3) == (items, [])


def test_collator_restarts_positions_and_pads_without_labels():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9], "seq_lengths": [3, 2]},
            {"input_ids": [1, 2], "labels": [IGNORE, 2], "seq_lengths": [2]}]
    batch = PackedCollator(pad_id=0)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE, 2, IGNORE, IGNORE, IGNORE]
    assert "attention_mask" not in batch  # a mask would hide the packing from the model
    flat = PackedCollator(pad_id=0, flat=True)(rows)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5, 7] and flat["max_length_q"] == 3


@pytest.mark.parametrize("flat", [False, True])
def test_packed_examples_do_not_see_each_other(tiny_model, smol, flat):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    examples = [encode(smol, [{"role": "user", "content": f"質問{i}" * (i + 1)},
                              {"role": "assistant", "content": f"回答{i}" * (4 - i)}]) for i in range(3)]
    big, second = sorted((len(e["input_ids"]) for e in examples), reverse=True)[:2]
    rows = pack(examples, big + second, packing=True)  # two examples share the first row, the third pads the second
    assert [len(r["seq_lengths"]) for r in rows] == [2, 1]
    batch = PackedCollator(smol.pad_token_id, flat)(rows)
    layout = [[n for r in rows for n in r["seq_lengths"]]] if flat else [r["seq_lengths"] for r in rows]
    assert_packed_rows_stay_apart(model, batch, layout, atol=1e-4)
