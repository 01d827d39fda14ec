import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUNDLED = "bundled:smollm2-135m-instruct"


@pytest.fixture(autouse=True, scope="session")
def _hf_home(tmp_path_factory):
    # `datasets` and the hub cache write under HF_HOME; keep tests from touching the user's cache.
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct, loaded once per session (converted from GGUF once per machine)."""
    from ezoforge.models import load

    return load(BUNDLED)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def live_server(bundled):
    """`ezo serve`'s app with the bundled model on a loopback port; yields the base URL (…/v1 for clients)."""
    from ezoforge.infer.generate import Generator
    from ezoforge.infer.serve import BackgroundServer, create_app

    with BackgroundServer(create_app(Generator(bundled), BUNDLED)) as url:
        yield url
