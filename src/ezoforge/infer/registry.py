"""The backend class a `synth.backend` or `eval.backend` name stands for, imported from its line in
`config.BACKENDS` on first use."""
from __future__ import annotations

from ezoforge.config import BACKENDS, imported
from ezoforge.infer.backends import Backend


def backend_class(name: str) -> type[Backend]:
    kind = imported(BACKENDS[name])
    if not (isinstance(kind, type) and issubclass(kind, Backend)) or kind.name != name:
        raise TypeError(f"config.BACKENDS[{name!r}] is {BACKENDS[name]}, which is not a Backend named {name!r}")
    return kind
