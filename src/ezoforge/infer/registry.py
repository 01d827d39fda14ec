"""The backends synth and eval answer through, by the name `synth.backend` and `eval.backend` take
(`config.BackendName` lists the same names). A new backend is its class, in its own module if it likes, and a line
here."""
from __future__ import annotations

from ezoforge.infer.backends import Backend, OpenAIBackend, TransformersBackend, VLLMBackend
from ezoforge.infer.llamacpp import LlamaCppBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TransformersBackend, VLLMBackend, OpenAIBackend,
                                                          LlamaCppBackend)}
