"""Tiny random models of the base families beyond Llama, built offline: Qwen3, Gemma 3 (the text model, and the
multimodal checkpoint class the 4B and larger ones use) and Mistral, each with a tokenizer of its family's kind
trained on the package's own Japanese text and its family's real chat template.

- Qwen3: byte-level BPE with Qwen2's pre-tokenizer regex, ChatML with the think block.
- Gemma 3: SentencePiece-style BPE (spaces as ▁, byte fallback, no pre-tokenizer), no system role.
- Mistral: SentencePiece-style BPE with a Metaspace pre-tokenizer ([INST] … [/INST], v0.3's template).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ezoforge.config import bundled_data
from ezoforge.gguf_file import QWEN2_SPLIT
from ezoforge.records import read_rows

# Qwen3's own template (thinking on unless turned off), from the one recipes/qwen3-8b.yaml ships with thinking off:
# that file is Qwen3's template, less its tool-calling branches, with its generation prompt's condition reversed.
_NO_THINK = (Path(__file__).resolve().parents[1] / "recipes" / "qwen3-no-think.jinja").read_text(encoding="utf-8")
QWEN3_TEMPLATE = _NO_THINK.split("-#}\n", 1)[1].replace(
    "not (enable_thinking is defined and enable_thinking is true)", "enable_thinking is defined and enable_thinking is false")
assert QWEN3_TEMPLATE != _NO_THINK.split("-#}\n", 1)[1]

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""


def corpus(limit: int = 400) -> list[str]:
    """Japanese text the tokenizers learn from: the demo tasks and the FineWeb demo documents."""
    texts = []
    with open(bundled_data("bundled:tasks/demo-tasks.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["input"], row["output"]]
    texts += [doc["text"] for _, doc in read_rows(bundled_data("bundled:web/fineweb-demo.parquet"))][:limit]
    return texts + ["Hello, world! The system says 123 and 4567.", "東京は日本の首都です。"]


def _byte_level_bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _sentencepiece_bpe(vocab_size: int, specials: list[str], metaspace: bool):
    """A BPE over ▁-marked text with byte fallback, its vocabulary laid out as SentencePiece's: the special pieces,
    the 256 byte pieces, then the learned pieces in merge order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def shaped(model):
        tok = Tokenizer(model)
        if metaspace:  # Mistral: ▁ before the first word and for every space
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        else:  # Gemma: spaces become ▁, nothing is prepended
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok

    learner = shaped(models.BPE())
    learner.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = shaped(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    return tok


def _fast(tok, template: str, **special):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = template
    return fast


@functools.cache
def qwen3_tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level_bpe(1200, specials)
    tok.add_tokens(["<think>", "</think>"])  # Qwen3's think markers: added, not special
    return _fast(tok, QWEN3_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@functools.cache
def gemma3_tokenizer():
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    return _fast(_sentencepiece_bpe(1200, specials, metaspace=False), GEMMA3_TEMPLATE, bos_token="<bos>",
                 eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", add_bos_token=False)


@functools.cache
def mistral_tokenizer():
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    fast = _fast(_sentencepiece_bpe(1200, specials, metaspace=True), MISTRAL_TEMPLATE, bos_token="<s>",
                 eos_token="</s>", unk_token="<unk>")
    return fast


def _config(family: str, tok):
    from transformers import Gemma3TextConfig, MistralConfig, Qwen3Config

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    if family == "qwen3":  # head_dim apart from hidden / heads, as in Qwen3-0.6B; tied as the small ones are
        return Qwen3Config(**shape, **ids, head_dim=32, tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6})
    if family == "gemma3":  # six layers: Gemma 3's pattern of five sliding-window layers and a full one, each kind
        # with its own rope base; a window shorter than the test's texts
        return Gemma3TextConfig(**{**shape, "num_hidden_layers": 6}, **ids, head_dim=32, query_pre_attn_scalar=32,
                                sliding_window=16)
    return MistralConfig(**shape, **ids, head_dim=16, sliding_window=None)


TOKENIZERS = {"qwen3": qwen3_tokenizer, "gemma3": gemma3_tokenizer, "mistral": mistral_tokenizer}
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM"}


def make_tiny(family: str, out: Path, dtype: torch.dtype = torch.float32, context: int = 2048,
              shard: str | None = None) -> str:
    """A randomly initialised 2-layer model of `family` (Gemma 3: six), with its tokenizer and chat template, saved in
    `dtype` (in shards of at most `shard` when given)."""
    from transformers import AutoModelForCausalLM

    tok = TOKENIZERS[family]()
    cfg = _config(family, tok)
    cfg.max_position_embeddings = context
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random norms (they start at 1, or 0 for Gemma's 1 + w), so a converter that drops or
        for name, p in model.named_parameters():  # misreads one shows in the logits
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(out)
    assert json.loads((Path(out) / "config.json").read_text())["architectures"] == [ARCHITECTURES[family]]
    return str(out)


def make_tiny_multimodal(out: Path) -> str:
    """Gemma 3's multimodal checkpoint class (Gemma3ForConditionalGeneration, as its 4B and larger models ship) with
    a tiny SigLIP vision tower beside the tiny Gemma 3 text model."""
    from transformers import AutoModelForCausalLM, Gemma3Config, SiglipVisionConfig

    tok = gemma3_tokenizer()
    text = _config("gemma3", tok)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    image = tok.convert_tokens_to_ids("<unk>")  # no image ever reaches these tests
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=image,
                       eoi_token_index=image, image_token_index=image)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((Path(out) / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    return str(out)
