"""Backends render alike: a request's own messages fix the prompt the model reads, whichever backend sends it.
synth's real requests for passages of the package's paragraphs and eval's conversations become the same token ids
in-process (the rendering vLLM is given too) and through `ezo serve` with its defaults on, its recipe system prompt
included. And the backend registry: one name list, and the cache keys stored before it."""
import copy
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from conftest import BUNDLED
from ezoforge.cache import request_key
from ezoforge.config import BACKENDS, bundled_data
from ezoforge.errors import ConfigError
from ezoforge.eval.run import _Models
from ezoforge.infer.backends import CONTINUE, OpenAIBackend, as_requests
from ezoforge.infer.generate import Generator, Sampling, build_messages
from ezoforge.infer.registry import backend_class
from ezoforge.infer.serve import BackgroundServer, create_app
from ezoforge.stages import load_recipe
from ezoforge.synth.passages import read_docs, sentences
from ezoforge.synth.run import _answer_settings, build_requests, make_backend
from ezoforge.turns import default_system

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's own


@pytest.fixture(scope="module")
def served(bundled):
    """`ezo serve` as its command starts on the default recipe: the recipe's system prompt for a conversation that
    has none, and its reply length."""
    recipe = load_recipe(None, [])
    assert recipe.model.system_prompt and recipe.model.system_prompt != SMOLLM_SYSTEM
    app = create_app(Generator(bundled), BUNDLED, None, recipe.model.system_prompt, recipe.generation.max_new_tokens,
                     recipe.serve)
    with BackgroundServer(app) as url:
        yield url


def eval_conversations(system: str) -> list[list[dict[str, str]]]:
    """A demo task as eval asks it, and a second turn in the conversation that holds the first answer."""
    task = json.loads(Path(bundled_data("bundled:tasks/demo-tasks.jsonl")).read_text(encoding="utf-8").splitlines()[0])
    first = build_messages(task["input"], system)
    return [first, first + [{"role": "assistant", "content": "光合成は植物が糖を作るはたらきです。"},
                            {"role": "user", "content": "では、動物は光合成をしますか。"}]]


def served_ids(url: str, req) -> list[int]:
    """The prompt's token ids as `ezo serve` rendered them, for the messages the openai backend sends."""
    body = {"messages": OpenAIBackend.continued(req), **CONTINUE} if req.prefill else \
        {"messages": OpenAIBackend.instructed(req)}
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       json={"model": BUNDLED, "max_tokens": 1, "temperature": 0, "return_token_ids": True, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()["prompt_token_ids"]


def test_synth_and_eval_requests_render_the_same_ids_in_process_and_through_ezo_serve(served):
    recipe = load_recipe(None, ["synth.backend=transformers"])
    local = make_backend(recipe, BUNDLED, static_cache=False)
    # Two paragraphs' first sentences: a passage renders as a longer one would, and two of unequal length are still
    # batched with padding; the prompts below are read in full 3 times by a 135M model (~700 tokens each).
    docs = [replace(d, text=sentences(d.text)[0])
            for d in list(read_docs([Path(bundled_data("bundled:heldout/heldout-ja.jsonl"))]))[:2]]
    synth = build_requests(docs, local, recipe)
    conversations = eval_conversations(recipe.model.system_prompt)
    assert len(synth) == 2 and all(r.prefill and r.messages[0] == ("system", SMOLLM_SYSTEM) for r in synth)
    for req in synth:
        # in-process synth renders the prompt it rendered before its requests named their system message
        assert local.render(req) == local.tokenizer.apply_chat_template(
            req.chat()[1:], tokenize=False, add_generation_prompt=True) + req.prefill

    ids = [local.prompt_ids(r) for r in synth + as_requests(conversations)]
    assert [served_ids(served, r) for r in synth + as_requests(conversations)] == ids

    # and through the clients synth and eval answer with: the same prompt sizes
    remote = OpenAIBackend(f"{served}/v1", BUNDLED, None, 120, 0, 2, None, 4096)
    for backend in (local, remote):
        sizes = {}
        backend.run(synth, Sampling(max_new_tokens=1), lambda i, out: sizes.__setitem__(i, out.prompt_tokens))
        answers = backend.complete(conversations, Sampling(max_new_tokens=1))
        assert [sizes[i] for i in range(len(synth))] + [a.prompt_tokens for a in answers] == [len(x) for x in ids]
    assert remote.continues is True  # the prefill was continued, not restated in the user message


def test_the_system_message_a_template_adds_by_itself(bundled):
    tok = bundled.tokenizer
    user = [{"role": "user", "content": "こんにちは"}]
    assert default_system(tok) == SMOLLM_SYSTEM
    assert tok.apply_chat_template([{"role": "system", "content": SMOLLM_SYSTEM}, *user], tokenize=False) == \
        tok.apply_chat_template(user, tokenize=False)
    plain = copy.deepcopy(tok)  # a template that adds no system turn of its own
    plain.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    assert default_system(plain) == ""
    plain.chat_template = None
    assert default_system(plain) == ""


def test_every_backend_line_names_its_class_and_an_unknown_name_is_refused():
    assert {name: backend_class(name).name for name in BACKENDS} == {name: name for name in BACKENDS}
    with pytest.raises(ConfigError, match="unknown backend 'tgi': one of auto, transformers, vllm, openai, llamacpp"):
        load_recipe(None, ["synth.backend=tgi"])


def test_cache_keys_stay_those_stored_before(tmp_path):
    # synth: a vLLM engine's quantization only when set; a server is named by the key's url, not again
    assert _answer_settings(load_recipe(None, ["synth.backend=vllm"]).synth) == {}
    assert _answer_settings(load_recipe(None, ["synth.backend=vllm", "synth.vllm.quantization=fp8"]).synth) == \
        {"quantization": "fp8"}
    assert _answer_settings(load_recipe(None, ["synth.backend=openai", "synth.base_url=http://x/v1"]).synth) == {}
    # eval: this process's model by its fingerprint; an engine by the fingerprint with its URL or vLLM settings
    recipe = load_recipe(None, [f"eval.cache={tmp_path / 'c.sqlite'}", "eval.backend=transformers"])
    assert _Models(recipe.model, None, recipe.eval).answer_identity("fp") == "fp"
    served = load_recipe(None, ["eval.backend=openai", "eval.base_url=http://127.0.0.1:9/v1"])
    assert _Models(served.model, None, served.eval).answer_identity("fp") == \
        request_key(model="fp", backend="openai", base_url="http://127.0.0.1:9/v1")[:16]
    assert backend_class("vllm").answer_settings(load_recipe(None, ["eval.backend=vllm"]).eval) == {"quantization": "none"}


def test_eval_without_a_system_prompt_sends_the_one_the_template_would_add(tmp_path):
    """model.system_prompt: null still sends an explicit system message: the chat template's own in this process
    (the prompt it renders is unchanged), an empty one to a server, so a server's default never stands in."""
    recipe = load_recipe(None, ["model.system_prompt=null", f"eval.cache={tmp_path / 'c.sqlite'}", "eval.backend=transformers"])
    assert _Models(recipe.model, None, recipe.eval).default_system() == SMOLLM_SYSTEM
    served = load_recipe(None, ["model.system_prompt=null", "eval.backend=openai", "eval.base_url=http://127.0.0.1:9/v1"])
    assert _Models(served.model, None, served.eval).default_system() == ""
