"""Checkpoints left by another study of the same name never break a new one."""

from __future__ import annotations

from optuna.trial import TrialState

from search.run import create_or_load
from search.spec import parse_spec
from search.storage import open_storage, quiet_optuna_warnings
from search.workers import run_worker
from trainers import CheckpointStore, StopTraining, train

quiet_optuna_warnings()

def test_a_leftover_checkpoint_of_another_study_is_not_resumed(tmp_path, study_name):
    # A run killed mid-trial under this study name, in another storage, left trial-0 behind.
    left = CheckpointStore(tmp_path / "ckpt" / study_name / "trial-0")

    def stop(m):
        raise StopTraining("killed")

    train({"dataset": "synthetic", "hidden": [8], "epochs": 3, "lr": 0.5, "device": "cpu"},
          stop, left)
    assert left.load() is not None
    spec = parse_spec({
        "name": study_name, "budget": {"trials": 2, "epochs": 2},
        "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
        "data": {"dataset": "synthetic", "size": 256}, "model": {"hidden": [16]},
        "space": {"lr": {"low": 1e-3, "high": 0.3, "log": True}},
        "run": {"checkpoint_dir": str(tmp_path / "ckpt")},
    })
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 'new.db'}"))
    run_worker(study, spec, device="cpu")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["epochs_run"] == 2 for t in study.trials)
