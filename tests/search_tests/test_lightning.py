"""search.integrations.lightning with real Lightning: the callback under a real `search.Trial`
(reports, pruning, `hpsearch stop`, resuming, no trial folder), and examples/lightning end to
end through `hpsearch run`, a worker killed in the middle of a trial.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as L
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search import Trial
from search.integrations.lightning import HpsearchCallback
from search.trial._api import HISTORY_FILE
from tests.search_tests.studies import run_killing_a_worker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning"
NAME = "lightning-example"


class Tiny(L.LightningModule):
    """A linear classifier of 8 features; `epochs` lists the epochs it trained (0-based)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.epochs: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.epochs.append(self.current_epoch)

    def on_train_epoch_end(self) -> None:  # logged after the callbacks' hook: still reported
        self.log("epochs_done", float(self.current_epoch + 1))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches() -> DataLoader:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def fit(trial: Trial, epochs: int = 4) -> tuple[Tiny, HpsearchCallback, L.Trainer]:
    """`Tiny` fitted under `trial` as a user's `fit` would: resumed from the trial's last
    checkpoint, if any."""
    model, hp = Tiny(), HpsearchCallback(trial)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[hp], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, batches(), batches(), ckpt_path=hp.resume_from)
    return model, hp, trainer


def checkpointed_epoch(hp: HpsearchCallback) -> int:
    """The epoch (1-based, as reported) of the trial's checkpoint."""
    assert hp.resume_from is not None
    return torch.load(hp.resume_from, map_location="cpu", weights_only=False)["epoch"] + 1


def epochs_of(trial: Trial) -> list[int]:
    return [int(r["epoch"]) for r in trial.history]


def test_pruned_at_epoch_2_lightning_stops_there_without_a_checkpoint_of_it(tmp_path):
    asked = []

    def pruner(epoch: int, values: dict[str, float]) -> str | None:
        asked.append(epoch)
        return "pruned at epoch 2" if epoch == 2 else None

    trial = Trial(number=0, study_name="s", params={}, epochs=4, checkpoint_dir=tmp_path,
                  on_report=pruner)
    model, hp, trainer = fit(trial)  # returns: nothing raised out of trainer.fit
    assert model.epochs == [0, 1]  # no epoch 3 trained
    assert trainer.state.finished and trainer.should_stop
    assert trial.stopped == "pruned at epoch 2" and not trial.stop_requested
    assert asked == [1, 2] and epochs_of(trial) == [1, 2]
    # Every report holds this epoch's metrics: validation, training, the module's epoch end.
    assert all(set(r) == {"epoch", "val_loss", "train_loss", "epochs_done"}
               and r["epochs_done"] == r["epoch"] for r in trial.history)
    assert checkpointed_epoch(hp) == 1  # epoch 1's: none written after the pruning report


@pytest.mark.parametrize("stop_after", [0, 2])
def test_hpsearch_stop_ends_the_fit_after_a_checkpoint_and_the_retry_resumes(
        tmp_path, stop_after):
    """`stop` true from the start (stopped at the first report, checkpointed first) or from
    epoch 2's checkpoint on; the trial queued again resumes from the checkpoint."""
    trial = Trial(number=0, study_name="s", params={}, epochs=4, checkpoint_dir=tmp_path,
                  stop=lambda: len(trial.history) >= stop_after)
    model, hp, _ = fit(trial)
    stopped_at = max(stop_after, 1)
    assert trial.stop_requested and trial.stopped is None
    assert model.epochs == list(range(stopped_at))
    assert checkpointed_epoch(hp) == stopped_at
    assert [r["epoch"] for r in json.loads((tmp_path / HISTORY_FILE).read_text())] == list(
        range(1, stopped_at + 1))  # the reports, saved beside the checkpoint

    again = Trial(number=1, study_name="s", params={}, epochs=4, checkpoint_dir=tmp_path)
    model, _, _ = fit(again)
    assert model.epochs == list(range(stopped_at, 4))  # Lightning went on from the checkpoint
    assert epochs_of(again) == [1, 2, 3, 4] and again.resumed_from_epoch == stopped_at


def test_without_a_trial_folder_it_reports_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trial = Trial(number=0, study_name="s", params={}, epochs=3)
    model, hp, _ = fit(trial, epochs=3)
    assert model.epochs == [0, 1, 2] and epochs_of(trial) == [1, 2, 3]
    assert all(r["epochs_done"] == r["epoch"] and "train_loss" in r for r in trial.history)
    assert hp.resume_from is None
    # The callback is the Trainer's checkpointing: no default ModelCheckpoint in the cwd.
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    folder = tmp_path / "not-a-folder"
    folder.write_text("")
    trial = Trial(number=0, study_name="s", params={}, epochs=2, checkpoint_dir=folder)
    model, hp, _ = fit(trial, epochs=2)
    assert model.epochs == [0, 1] and epochs_of(trial) == [1, 2]  # trained and reported on
    assert hp.resume_from is None
    assert "Lightning checkpoint not saved" in caplog.text


# --------------------------------------------------------------------------- the example

TRIALS, EPOCHS = 4, 4


@pytest.fixture
def project(tmp_path) -> Path:
    """The example copied as a user would have it, its budget made small and its heartbeat
    quick, so that a dead worker's trial is failed and retried within seconds."""
    folder = tmp_path / "lightning"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(
        "checkpoints", "retrain-*", "*.db*", "__pycache__"))
    study = yaml.safe_load((folder / "study.yaml").read_text())
    study["budget"] = {"trials": TRIALS, "epochs": EPOCHS}
    study["fixed"]["train_subset"] = 2000
    study["space"]["batch_size"] = {"pow2": [64, 128]}
    study["space"]["lr"] = {"low": 1.0e-3, "high": 1.0e-2, "log": True}
    study["run"] = {"heartbeat_interval": 1, "grace_period": 3}
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder


@pytest.mark.slow
@pytest.mark.serial
def test_the_example_resumes_a_killed_trial_and_beats_chance(project):
    def ready(number: int, last: int | None) -> bool:
        """A Lightning checkpoint and two epochs still to train (hyperband prunes at epochs
        1 and 3 only: the trial is not ending)."""
        folder = project / "checkpoints" / NAME / f"trial-{number}"
        return last is not None and last <= EPOCHS - 2 and (
            folder / "lightning" / "last.ckpt").is_file()

    killed, code, out = run_killing_a_worker(project, ready)
    assert code == 0, out  # the budget was met by the worker left

    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{project / 'hpsearch.db'}")
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS, out
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed], out
    retry = next(t for t in trials if t.user_attrs.get("retried_from") == killed)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    # Lightning went on from the dead trial's checkpoint: its first epoch was after it.
    assert retry.user_attrs["resumed_from_epoch"] >= 1, out
    epochs = [r["epoch"] for r in retry.user_attrs["history"]]
    assert epochs == list(range(1, len(epochs) + 1))
    assert not list((project / "checkpoints" / NAME).glob("trial-*/lightning/last.ckpt"))
    # Ten classes: chance is 0.1.
    assert study.best_value >= 0.3, out
