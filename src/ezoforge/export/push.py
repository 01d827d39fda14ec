"""`ezo push`: upload an `ezo export` folder to the Hugging Face Hub.

The token comes from the HF_TOKEN environment variable only (not a saved login) and is never written anywhere.
"""
from __future__ import annotations

import re
from pathlib import Path

from ezoforge.config import secret
from ezoforge.errors import ConfigError, EzoError
from ezoforge.export.run import STAGE_FILES
from ezoforge.stage import done_info

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def files(folder: Path) -> list[tuple[str, int]]:
    """What an upload sends: the folder's files, less the export stage's own records."""
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in STAGE_FILES and not p.name.startswith(".")]


def push(folder: str | Path, repo: str, private: bool = False, dry_run: bool = False) -> dict:
    folder = Path(folder)
    if not REPO_ID.match(repo):
        raise ConfigError(f"--repo {repo!r}: expected USER/NAME")
    info = done_info(folder)
    if info is None or info.stage != "export":
        raise EzoError(f"{folder}: not a finished `ezo export` folder (no DONE from export)")
    listing = files(folder)
    result = {"repo": repo, "private": private, "files": listing, "bytes": sum(s for _, s in listing)}
    if dry_run:
        return result
    token = secret("HF_TOKEN", "ezo push needs a Hugging Face token")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          allow_patterns=[name for name, _ in listing], commit_message="Upload with ezo push")
    except Exception as e:  # hub unreachable, bad token, no rights: say so without a traceback
        raise EzoError(f"ezo push to {repo} failed: {type(e).__name__}: {e}") from None
    return {**result, "url": str(url)}
