"""train.report_to: passed through to the trainer; TensorBoard event files land in the train folder."""
import importlib.util

import pytest
import torch

from ezoforge.errors import ConfigError
from ezoforge.stages import load_recipe
from ezoforge.train import run as train_run
from ezoforge.train.progress import read_metrics
from trainkit import elyza_rows, overrides, tiny_model  # noqa: F401  (fixtures)

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_report_to_reaches_the_trainer_config():
    cfg = load_recipe(None, ["train.report_to=[wandb, mlflow]"]).train
    assert train_run.sft_config(cfg, "/tmp/x", torch.device("cpu"), False).report_to == ["wandb", "mlflow"]
    assert train_run.sft_config(load_recipe(None).train, "/tmp/x", torch.device("cpu"), False).report_to == []
    with pytest.raises(ConfigError, match="train.report_to"):
        load_recipe(None, ["train.report_to=neptune"])


def test_a_tracker_that_is_not_installed_fails_before_training(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    recipe = load_recipe(None, overrides(tiny_model, max_steps=2) + ["train.report_to=mlflow"])
    with pytest.raises(ConfigError, match="mlflow is not installed"):
        train_run.run(recipe, [elyza_rows], tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs tensorboard (pip install tensorboard)")
def test_tensorboard_events_in_the_train_folder_hold_the_loss(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "t"
    recipe = load_recipe(None, overrides(tiny_model, max_steps=3, save_every=3) + ["train.report_to=tensorboard"])
    train_run.run(recipe, [elyza_rows], out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    ours = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert sorted(logged) == sorted(ours) == [1, 2, 3]
    assert [logged[s] for s in sorted(logged)] == pytest.approx([ours[s] for s in sorted(ours)], rel=1e-4)
