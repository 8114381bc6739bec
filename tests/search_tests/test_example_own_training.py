"""examples/own_training end to end: a user's own training loop (`trainer: pkg.module:fit`),
an autoencoder on real FashionMNIST, killed in the middle of a trial.

The study runs through `hpsearch run` with two workers, as its README says, with a smaller
budget. One worker is SIGKILLed once its trial has checkpointed an epoch: the other worker
fails the dead trial when its heartbeat stops, retries it, and the user's loop resumes from its
checkpoint. Status, report and retrain read the study.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.search_tests.studies import run_killing_a_worker, views_and_retrain

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_training"
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
NAME = "own-training"
TRIALS, EPOCHS = 5, 3

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def project(tmp_path) -> Path:
    """The example copied as a user would have it, its budget made small and its heartbeat
    quick, so that a dead worker's trial is failed and retried within seconds."""
    folder = tmp_path / "own_training"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(
        "checkpoints", "retrain-*", "*.db*", "__pycache__"))
    study = yaml.safe_load((folder / "study.yaml").read_text())
    study["budget"] = {"trials": TRIALS, "epochs": EPOCHS}
    study["fixed"]["train_subset"] = 6000  # epochs of about half a second
    study["space"]["batch_size"] = {"pow2": [32, 64]}
    study["space"]["hidden"] = {"choices": [64, 128]}
    study["run"] = {"heartbeat_interval": 1, "grace_period": 3}
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder


def test_a_killed_trial_resumes_from_its_checkpoint_and_every_view_reads_the_study(project):
    def ready(number: int, last: int | None) -> bool:  # state.pt: after each epoch's report
        checkpoint = project / "checkpoints" / NAME / f"trial-{number}" / "state.pt"
        return last is not None and last < EPOCHS and checkpoint.is_file()

    killed, code, out = run_killing_a_worker(project, ready)
    assert code == 0, out  # the budget was met by the worker left

    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{project / 'hpsearch.db'}")
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS, out  # exactly the budget: the dead trial is not counted
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed], out
    retry = next(t for t in trials if t.user_attrs.get("retried_from") == killed)
    victim = next(t for t in trials if t.number == killed)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.params == victim.params
    # It went on from the dead trial's checkpoint, not from scratch, and its history holds the
    # dead trial's epochs before its own.
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 1
    epochs = [r["epoch"] for r in retry.user_attrs["history"]]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= resumed
    assert sorted(retry.intermediate_values) == epochs  # what the pruner saw, the same
    assert all("val_recon" in r and "train_recon" in r for r in retry.user_attrs["history"])
    # No trial is left with its checkpoints: each is deleted once its trial has ended.
    assert not list((project / "checkpoints" / NAME).glob("trial-*/state.pt"))

    counts, results = views_and_retrain(HPSEARCH, NAME, project)
    assert counts["finished"] == TRIALS and counts["failed"] == 1
    assert results["trial"] == study.best_trial.number
    # Mean squared error per pixel in normalized units: predicting the mean pixel scores 1.0.
    assert 0 < results["test_recon"]["mean"] < 1.0
