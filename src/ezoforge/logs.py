"""Log lines and progress bars through rich on one console, on stderr (stdout holds only what a command answers):
`ezo` itself, and each of `ezo run`'s stage processes."""
from __future__ import annotations

import logging

from rich.console import Console

# The one console of a process: log lines and progress bars share its display, and never go to stdout.
console = Console(stderr=True)


def setup_logging(level: int) -> None:
    """Log lines on `console`, where the process's progress bars are too, so both share one display."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])
    for noisy in ("httpx", "httpx2", "urllib3", "datatrove"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
