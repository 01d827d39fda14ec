"""A backend in a module of its own: the worked example of ARCHITECTURE.md's "A synth/eval backend". It answers
from canned text (a synth request with a pair about its passage's first sentence, an eval question with a fixed
reply), loads no model, and says what it takes for `ezo plan`. `tests/test_new_backend.py` adds its one line to
`config.BACKENDS`."""
from ezoforge.completion import Completion
from ezoforge.infer.backends import Backend
from ezoforge.sizing import EngineEstimate

TOKENS_PER_S = 1000.0
REPLY = "はい、日本語でお答えします。"


class CannedBackend(Backend):
    name = "canned"
    served = True  # the model is a name: nothing loads in the stage's process

    @classmethod
    def build(cls, section, target) -> "CannedBackend":
        return cls()

    @classmethod
    def estimate(cls, section, job) -> EngineEstimate:
        return EngineEstimate(f"canned replies: no model, {TOKENS_PER_S:,.0f} tokens/s", ram_gib=0.5,
                              tokens_per_s=TOKENS_PER_S)

    def run(self, reqs, sampling, done) -> None:
        for i, req in enumerate(reqs):
            first = req.passage.split("。")[0]
            pairs = f"{req.prefill} {first}。\n質問2: それは何ですか。\n回答2: {first}のことです。"
            text = pairs if req.prefill else REPLY
            done(i, Completion(text, self.request_tokens(req), len(text), "stop"))
