"""A hub base cannot change under a run: train records the commit of the base it loaded, and merge and base + adapter
load that commit again (not what `main` names by then), or fail naming it.

Offline, on a hub cache laid out as huggingface_hub writes it (snapshots/<commit>/, refs/main) holding the tiny
2-layer Llama: `main` is moved and old snapshots removed as a hub update and a cache clean-up would."""
import json
import shutil

import pytest
import torch

from ezoforge.errors import ModelError
from ezoforge.models import check_model, load, model_identity
from ezoforge.stage import done_info
from ezoforge.stages import load_recipe
from ezoforge.train import merge
from ezoforge.train import run as train_run
from trainkit import elyza_rows, overrides, tiny_model  # noqa: F401  (fixtures)

REPO = "ezo-test/pinned-llama"
FIRST, SECOND = "1" * 40, "2" * 40


class Hub:
    """A hub cache holding REPO; huggingface_hub reads it through its HF_HUB_CACHE constant (patched by the caller)."""

    def __init__(self, root, source: str):
        self.root, self.source = root, source
        self.repo = root / "models--ezo-test--pinned-llama"

    def add(self, commit: str, shift: float = 0.0) -> None:
        """A snapshot of the tiny model; `shift` moves every weight (another revision of the base)."""
        from safetensors.torch import load_file, save_file

        snapshot = self.repo / "snapshots" / commit
        shutil.copytree(self.source, snapshot)
        if shift:
            weights = snapshot / "model.safetensors"
            save_file({k: v + shift for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})

    def point_main(self, commit: str) -> None:
        (self.repo / "refs").mkdir(parents=True, exist_ok=True)
        (self.repo / "refs" / "main").write_text(commit)

    def drop(self, commit: str) -> None:
        shutil.rmtree(self.repo / "snapshots" / commit)

    def norm(self, commit: str) -> torch.Tensor:
        """A tensor no LoRA touches: the final norm, as a snapshot holds it."""
        from safetensors.torch import load_file

        return load_file(self.repo / "snapshots" / commit / "model.safetensors")["model.norm.weight"]


@pytest.fixture(scope="module")
def trained(tiny_model, elyza_rows, tmp_path_factory):  # noqa: F811
    """A train folder made on REPO while `main` named FIRST."""
    from huggingface_hub import constants

    hub = Hub(tmp_path_factory.mktemp("hub"), tiny_model)
    hub.add(FIRST)
    hub.point_main(FIRST)
    out = tmp_path_factory.mktemp("train") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(hub.root))
        train_run.run(load_recipe(None, overrides(REPO, max_steps=1, eval_fraction=0.0)), [elyza_rows], out)
    return out


@pytest.fixture
def hub(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """A fresh hub cache for one test, holding FIRST as train saw it."""
    from huggingface_hub import constants

    hub = Hub(tmp_path / "hub", tiny_model)
    hub.add(FIRST)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.root))
    return hub


def test_train_records_the_commit_it_loaded(trained):
    assert done_info(trained).settings["model"]["name"] == REPO
    assert done_info(trained).settings["model"]["revision"] == FIRST
    adapter = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (REPO, FIRST)


def test_merge_loads_the_recorded_commit_after_main_moved(trained, hub, tmp_path):
    from safetensors.torch import load_file

    hub.add(SECOND, shift=1.0)
    hub.point_main(SECOND)
    merge.run(trained, tmp_path / "merged", "float32")
    merged = load_file(tmp_path / "merged" / "model.safetensors")["model.norm.weight"]
    assert torch.equal(merged, hub.norm(FIRST)) and not torch.equal(merged, hub.norm(SECOND))
    assert done_info(tmp_path / "merged").settings["model"] == {"name": REPO, "revision": FIRST}


def test_merge_refuses_when_the_recorded_commit_is_gone(trained, hub, tmp_path):
    hub.add(SECOND, shift=1.0)
    hub.point_main(SECOND)
    hub.drop(FIRST)
    with pytest.raises(ModelError, match=f"{REPO}@{FIRST}"):
        merge.run(trained, tmp_path / "merged", "float32")
    assert not (tmp_path / "merged").exists() and not (tmp_path / ".merged.partial").exists()


def test_base_plus_adapter_runs_on_the_adapters_commit(trained, hub):
    adapter = trained / "adapter"
    hub.point_main(FIRST)
    before = model_identity(REPO, adapter, device="cpu")
    hub.add(SECOND, shift=1.0)
    hub.point_main(SECOND)
    assert model_identity(REPO, adapter, device="cpu") == before != model_identity(REPO, device="cpu")
    loaded = load(REPO, adapter, device="cpu", dtype="float32")
    assert torch.equal(loaded.model.get_base_model().model.norm.weight.detach(), hub.norm(FIRST))
    hub.drop(FIRST)
    with pytest.raises(ModelError, match=f"{REPO}@{FIRST}"):
        check_model(REPO, adapter, "cpu")


def test_eval_base_scores_the_commit_train_loaded(trained, hub, tmp_path):
    from ezoforge.config import bundled_data
    from ezoforge.stages import STEPS

    hub.add(SECOND, shift=1.0)
    hub.point_main(SECOND)
    heldout = bundled_data("bundled:heldout/heldout-ja.jsonl")
    recipe = load_recipe(None, [f"model.name={REPO}", "model.device=cpu", f"eval.tasks=[ppl:{heldout}]",
                                "eval.limit=1", f"eval.cache={tmp_path / 'requests.sqlite'}"])
    report = STEPS["eval-base"].run(recipe, tmp_path / "eval-base", {"train": trained}, False)
    assert report["model"]["spec"] == f"{REPO}@{FIRST}"
    assert report["model"]["fingerprint"] == model_identity(f"{REPO}@{FIRST}", device="cpu") \
        != model_identity(REPO, device="cpu")
