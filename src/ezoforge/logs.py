"""Log lines through rich on stderr: `ezo` itself, and each of `ezo run`'s stage processes."""
from __future__ import annotations

import logging

from rich.console import Console


def setup_logging(level: int, console: Console) -> None:
    """`console`: the one the process shows its progress on, so log lines and its spinners share one display."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])
    for noisy in ("httpx", "httpx2", "urllib3", "datatrove"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
