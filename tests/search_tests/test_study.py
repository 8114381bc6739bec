"""The study service end to end in-process: real Optuna, real storages, real trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search._errors import SpecError
from search.run import create_or_load, load
from search.spec import parse_spec
from search.storage import count_trials, open_storage, quiet_optuna_warnings
from search.workers import WorkerError, run_worker
from tests.search_tests.studies import OPTIMIZER_LR_BATCH, SGD_MOMENTUM, study_data

quiet_optuna_warnings()

def smoke(name: str, **changes) -> dict:
    space = {**OPTIMIZER_LR_BATCH, "lr": {"low": 1e-3, "high": 0.3, "log": True},
             **SGD_MOMENTUM}
    return study_data(name, **{"space": space, **changes})


def start(url: str, data: dict, tmp_path: Path, *, trials: int | None = None):
    data = {**data, "run": {"checkpoint_dir": str(tmp_path / "ckpt"),
                            **data.get("run", {})}}
    spec = parse_spec(data)
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    return create_or_load(spec, storage, trials=trials), spec

def test_study_runs_to_its_budget(storage_url, study_name, tmp_path):
    study, spec = start(storage_url, smoke(study_name), tmp_path)
    summary = run_worker(study, spec, device="cpu")
    assert summary.stopped == "budget"
    assert count_trials(study).finished == 4
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        assert {"host", "pid", "device", "history", "epochs_run", "seconds"} <= set(t.user_attrs)
        assert t.user_attrs["device"] == "cpu"
        assert len(t.user_attrs["history"]) == 2
        assert sorted(t.intermediate_values) == [1, 2]  # the objective reported every epoch
        assert ("momentum" in t.params) == (t.params["optimizer"] == "sgd")
    assert not list((tmp_path / "ckpt").rglob("*.pt"))  # checkpoints cleared when done

def test_budget_is_exact_across_a_resumed_study(sqlite_url, study_name, tmp_path):
    study, spec = start(sqlite_url, smoke(study_name), tmp_path, trials=2)
    run_worker(study, spec, device="cpu")
    assert count_trials(study).finished == 2
    study, spec = start(sqlite_url, smoke(study_name), tmp_path, trials=5)
    run_worker(study, spec, device="cpu")
    assert count_trials(study).finished == 5
    assert [t.number for t in study.trials] == list(range(5))

def test_enqueued_config_runs_first_and_once(sqlite_url, study_name, tmp_path):
    data = smoke(study_name, enqueue=[{"optimizer": "sgd", "lr": 0.05, "batch_size": 64,
                                       "momentum": 0.9}])
    study, spec = start(sqlite_url, data, tmp_path, trials=2)
    run_worker(study, spec, device="cpu")
    first = study.trials[0]
    assert first.params == {"optimizer": "sgd", "lr": 0.05, "log2_batch_size": 6,
                            "momentum": 0.9}
    assert first.user_attrs["batch_size"] == 64
    study, spec = start(sqlite_url, data, tmp_path, trials=3)  # resuming enqueues nothing
    run_worker(study, spec, device="cpu")
    assert sum(1 for t in study.trials if t.params.get("lr") == 0.05) == 1

def test_hopeless_trial_is_pruned_early(sqlite_url, study_name, tmp_path):
    data = smoke(
        study_name,
        budget={"trials": 2, "epochs": 4},
        pruner={"type": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        enqueue=[{"optimizer": "adam", "lr": 0.01, "batch_size": 32},
                 {"optimizer": "sgd", "lr": 0.001, "batch_size": 128, "momentum": 0.8}],
    )
    study, spec = start(sqlite_url, data, tmp_path)
    run_worker(study, spec, device="cpu")
    bad = study.trials[1]
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs["epochs_run"] < 4
    assert bad.user_attrs["ended"].startswith("pruned at epoch")

def test_diverged_trial_is_pruned_with_its_reason(sqlite_url, study_name, tmp_path):
    data = smoke(study_name, budget={"trials": 1, "epochs": 3},
                 space={"lr": {"low": 1.0, "high": 1e4, "log": True}},
                 fixed={"optimizer": "sgd", "momentum": 0.0},
                 enqueue=[{"lr": 1000.0}])
    study, spec = start(sqlite_url, data, tmp_path)
    run_worker(study, spec, device="cpu")
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["ended"].startswith("diverged")

def test_failing_trials_are_recorded_and_a_broken_setup_stops_the_worker(
        sqlite_url, study_name, tmp_path, monkeypatch):
    monkeypatch.setenv("HPSEARCH_DATA", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    data = smoke(study_name, data={"dataset": "mnist"},
                 run={"max_failures_in_row": 2, "heartbeat_interval": 10, "grace_period": 30})
    study, spec = start(sqlite_url, data, tmp_path)
    with pytest.raises(WorkerError, match="2 trials failed in a row"):
        run_worker(study, spec, device="cpu")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2
    assert all("DataNotFoundError" in t.user_attrs["ended"] for t in failed)

def test_a_changed_study_file_is_refused(sqlite_url, study_name, tmp_path):
    start(sqlite_url, smoke(study_name), tmp_path)
    changed = smoke(study_name)
    changed["space"]["lr"] = {"low": 1e-4, "high": 1.0, "log": True}
    with pytest.raises(SpecError, match="already exists with different settings.*space"):
        start(sqlite_url, changed, tmp_path)
    start(sqlite_url, smoke(study_name, budget={"trials": 9, "epochs": 2}), tmp_path)  # ok
    # Where trials are logged may change too: stored for the workers started from then on.
    start(sqlite_url, smoke(study_name, budget={"trials": 9, "epochs": 2},
                            tracking={"tensorboard": str(tmp_path / "tb")}), tmp_path)
    assert load(study_name, open_storage(sqlite_url))[1].tracking.tensorboard == str(
        tmp_path / "tb")

def test_a_worker_finds_the_spec_by_name(storage_url, study_name, tmp_path):
    _, spec = start(storage_url, smoke(study_name), tmp_path)
    study, stored = load(study_name, open_storage(storage_url))
    assert stored == spec
    with pytest.raises(SpecError, match="no study named 'nope'"):
        load("nope", open_storage(storage_url))

def test_plain_optuna_reads_the_study(storage_url, study_name, tmp_path):
    study, spec = start(storage_url, smoke(study_name, budget={"trials": 2, "epochs": 1}),
                        tmp_path)
    run_worker(study, spec, device="cpu")
    optuna_cli = str(Path(sys.executable).with_name("optuna"))
    listed = subprocess.run([optuna_cli, "studies", "--storage", storage_url],
                            capture_output=True, text=True, check=True)
    assert study_name in listed.stdout
    best = subprocess.run([optuna_cli, "best-trial", "--study-name", study_name,
                           "--storage", storage_url, "-f", "json"],
                          capture_output=True, text=True, check=True)
    assert str(study.best_trial.number) in best.stdout
    loaded = optuna.load_study(study_name=study_name, storage=storage_url)
    assert loaded.best_value == study.best_value

@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc", "grid", "nsga2"])
def test_every_sampler_runs_a_study(sampler, sqlite_url, study_name, tmp_path):
    space = {"optimizer": {"choices": ["sgd", "adam"]}, "batch_size": {"pow2": [32, 64]}}
    if sampler != "grid":
        space["lr"] = {"low": 1e-3, "high": 0.3, "log": True}
    data = smoke(study_name, budget={"trials": 3, "epochs": 1},
                 sampler={"type": sampler, "seed": 0}, space=space)
    study, spec = start(sqlite_url, data, tmp_path)
    run_worker(study, spec, device="cpu")
    assert count_trials(study).complete == 3

@pytest.mark.parametrize("pruner", ["hyperband", "asha", "median", "percentile", "none"])
def test_every_pruner_runs_a_study(pruner, sqlite_url, study_name, tmp_path):
    data = smoke(study_name, budget={"trials": 4, "epochs": 3}, pruner={"type": pruner})
    study, spec = start(sqlite_url, data, tmp_path)
    run_worker(study, spec, device="cpu")
    assert count_trials(study).finished == 4

def test_multi_objective_study_finds_a_pareto_front(sqlite_url, study_name, tmp_path):
    data = smoke(study_name, budget={"trials": 3, "epochs": 1},
                 objective={"metrics": ["val_loss", "epoch_seconds"]})
    del data["pruner"]  # none by default for several objectives
    study, spec = start(sqlite_url, data, tmp_path)
    run_worker(study, spec, device="cpu")
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert study.metric_names == ["val_loss", "epoch_seconds"]
    assert 1 <= len(study.best_trials) <= 3

def test_mysql_storage_runs_a_study(mysql_url, study_name, tmp_path):
    study, spec = start(mysql_url, smoke(study_name, budget={"trials": 2, "epochs": 1}),
                        tmp_path)
    run_worker(study, spec, device="cpu")
    assert count_trials(study).complete == 2
