"""The `export:` section of a recipe."""
from __future__ import annotations

from typing import Literal

from ezoforge.config import Section


class ExportConfig(Section):
    """`ezo export`: a publishable folder (weights, tokenizer, model card) and optional GGUF files."""

    gguf: list[Literal["f16", "q8_0"]] = []
    repo: str | None = None  # USER/NAME the card's usage snippet loads (None: the export folder's own path)
