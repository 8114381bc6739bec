"""A study's own training code: `trainer: pkg.module:fit` and `trainer: {command: [...]}`.

The function runs in the worker with hpsearch's `Trial`; the command runs as a process that
reports by printing lines. Either way: the trial's history, pruning, failures with their
reasons, artifacts, status, report and retrain, through the real command line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

import search
from search import Pruned, SpecError, Trial
from search.spec import parse_spec

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

CODE = '''
import math, os, signal, sys, time


def fit(params, trial):
    """A made-up curve: loss falls with the epoch and is best at lr 0.01."""
    state = trial.load_checkpoint() or {"epoch": 0}
    loss = None
    for epoch in range(state["epoch"] + 1, trial.epochs + 1):
        loss = (math.log10(params["lr"]) + 2) ** 2 + 1.0 / epoch + params.get("penalty", 0)
        trial.save_checkpoint({"epoch": epoch})
        time.sleep(params.get("sleep", 0))
        trial.report(epoch, score=loss, acc=1 - loss / 10)
    return loss


def final(params, trial):
    if trial.final:
        return {"test_score": 0.5 + trial.seed, "device": trial.device}
    return fit(params, trial)


def raises(params, trial):
    trial.report(1, score=1.0)
    raise RuntimeError(f"boom at lr {params['lr']:.3g}\\nsecond line")


def silent(params, trial):
    trial.report(1, other=1.0)


def nan(params, trial):
    trial.report(1, score=2.0)
    trial.report(2, score=float("nan"))
    raise AssertionError("report should have stopped the trial")


def returns_nan(params, trial):
    trial.report(1, other=1.0)
    return float("nan")


def backwards(params, trial):
    trial.report(2, score=1.0)
    trial.report(1, score=0.5)


def not_a_number(params, trial):
    trial.report(1, score="low")


def twice(params, trial):
    """Hugging Face's habit: train() reports the last evaluation, evaluate() reports it again."""
    for epoch in (1, 2, 2):
        trial.report(epoch, score=params["lr"] + 1.0 / epoch)
    return params["lr"] + 0.5


def swallows(params, trial):
    for epoch in range(1, 4):
        try:
            trial.report(epoch, score=float(trial.number + epoch))  # each trial worse
        except Exception:
            pass  # a user's broad except must not turn a pruned trial into a complete one
    return 1.0
'''

SCRIPT = '''
import json, os, signal, sys, time
import search

lr, epochs, mode = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
assert json.loads(os.environ["HPSEARCH_PARAMS"])["lr"] == lr
if mode == "pidfile":
    with open(os.environ["PIDFILE"], "w") as f:
        f.write(str(os.getpid()))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, lambda *a: None)  # ignores SIGTERM: needs the SIGKILL
for epoch in range(1, epochs + 1):
    print(f"training epoch {epoch}", flush=True)
    if mode == "fail" and epoch == 2:
        print("CUDA error: something went wrong", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "garbage":
        print('@hpsearch {"epoch": 1, "score": ', flush=True)
    search.report(epoch, score=(lr - 0.01) ** 2 + 1.0 / epoch)
    if mode in ("hang", "stubborn", "pidfile"):
        time.sleep(600)
if os.environ.get("HPSEARCH_FINAL") == "1":
    search.report(epochs + 1, test_score=0.25, seed=int(os.environ["HPSEARCH_SEED"]))
'''


def hp(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def study_file(folder: Path, name: str = "mine", **changes) -> Path:
    (folder / "usercode.py").write_text(CODE)
    (folder / "script.py").write_text(SCRIPT)
    study = {
        "name": name, "trainer": "usercode:fit", "objective": {"metric": "score"},
        "budget": {"trials": 6, "epochs": 3}, "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"}, "fixed": {"penalty": 0.5},
        "space": {"lr": {"low": 1e-4, "high": 0.3, "log": True},
                  "batch_size": {"pow2": [16, 128]}},
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def trials_of(folder: Path, name: str = "mine") -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'hpsearch.db'}")
    return optuna.load_study(study_name=name, storage=storage).trials


# --------------------------------------------------------------------------- the Trial object


def test_report_checks_epochs_and_values_and_asks_the_verdict(tmp_path):
    said = []
    trial = Trial(number=3, study_name="s", params={"lr": 0.1}, checkpoint_dir=tmp_path,
                  on_report=lambda e, m: said.append((e, m)) or ("pruned" if e == 3 else None))
    trial.report(1, loss=np.float32(0.5), acc=torch.tensor(0.25))
    trial.report(2, loss=0.4)
    with pytest.raises(ValueError, match="metric 'loss' at epoch 4 is 'x', expected a number"):
        trial.report(4, loss="x")
    with pytest.raises(ValueError, match="whole number"):
        trial.report(1.5, loss=1.0)
    with pytest.raises(Pruned, match="pruned"):
        trial.report(3, loss=0.3)
    assert trial.stopped == "pruned" and said[0] == (1, {"loss": 0.5, "acc": 0.25})
    assert [r["epoch"] for r in trial.history] == [1, 2, 3]


def test_an_epoch_reported_again_is_ignored_with_one_warning(caplog):
    said = []
    trial = Trial(number=3, study_name="s", params={},
                  on_report=lambda e, m: said.append(e) or None)
    trial.report(1, loss=0.5)
    trial.report(2, loss=0.4)
    trial.report(2, loss=0.3)  # HF's `trainer.evaluate()` after `train()` does this
    trial.report(1, loss=0.9)
    warned = [r.getMessage() for r in caplog.records if r.name == "hpsearch.trial"]
    assert len(warned) == 1 and warned[0].startswith("trial #3: epoch 2 was reported already")
    assert said == [1, 2]  # the pruner saw each epoch once
    assert trial.history == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]
    trial.report(4, loss=0.35)
    with pytest.raises(ValueError, match="epoch 3 after epoch 4: epochs must increase"):
        trial.report(3, loss=0.3)  # back to an epoch never reported: still an error


def test_a_retry_gets_the_checkpoint_and_the_history_back(tmp_path):
    first = Trial(number=0, study_name="s", params={}, checkpoint_dir=tmp_path)
    assert first.load_checkpoint() is None
    for epoch in (1, 2, 3):
        first.report(epoch, loss=1.0 / epoch)
        if epoch < 3:
            first.save_checkpoint({"epoch": epoch, "weights": torch.ones(2) * epoch})
    retry = Trial(number=7, study_name="s", params={}, checkpoint_dir=tmp_path)
    state = retry.load_checkpoint()
    assert state["epoch"] == 2 and torch.equal(state["weights"], torch.full((2,), 2.0))
    assert retry.last_epoch == 3  # reported after the last checkpoint
    retry.report(3, loss=0.3)  # the loop resumes after epoch 2: epoch 3 is reported again
    assert [(r["epoch"], r["loss"]) for r in retry.history] == [(1, 1.0), (2, 0.5), (3, 0.3)]


def test_a_stop_request_ends_the_trial_right_after_a_checkpoint(tmp_path):
    from search.trial._api import StopRequested

    asked = {"stop": False}
    trial = Trial(number=0, study_name="s", params={}, checkpoint_dir=tmp_path,
                  stop=lambda: asked["stop"])
    trial.report(1, loss=1.0)
    trial.save_checkpoint({"epoch": 1})
    asked["stop"] = True
    trial.report(2, loss=0.5)  # it checkpoints: the stop waits for the next checkpoint
    with pytest.raises(StopRequested):
        trial.save_checkpoint({"epoch": 2})
    assert Trial(number=1, study_name="s", params={},
                 checkpoint_dir=tmp_path).load_checkpoint() == {"epoch": 2}
    never = Trial(number=2, study_name="s", params={}, stop=lambda: True)
    with pytest.raises(StopRequested):  # code that never checkpoints stops at a report
        never.report(1, loss=1.0)


def test_the_command_helpers_import_neither_torch_nor_optuna(tmp_path):
    code = ("import sys, search; search.report(2, loss=0.5, acc=1); "
            "print(search.params()['lr']); "
            "print(sorted(m for m in ('torch', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HPSEARCH_PARAMS": '{"lr": 0.1}'}, check=True)
    assert out.stdout.splitlines() == ['@hpsearch {"epoch": 2, "loss": 0.5, "acc": 1.0}',
                                       "0.1", "[]"]


def test_a_command_sees_its_workers_gpu_and_no_gpu_on_a_cpu_worker(monkeypatch):
    from search.trial._command import command_argv, command_env

    spec = parse_spec({"name": "x", "trainer": {"command": ["python", "t.py", "{lr}",
                                                            "{device}", "{batch_size}"]},
                       "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True},
                                 "batch_size": {"pow2": [16, 64]}}})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the supervisor pinned this worker
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a supervisor's worker has it set
    on_gpu = Trial(number=4, study_name="x", params={"lr": 0.01, "batch_size": 32},
                   device="cuda:0", threads=2)
    env = command_env(spec, on_gpu)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["HPSEARCH_DEVICE"] == "cuda:0"
    assert json.loads(env["HPSEARCH_PARAMS"]) == {"lr": 0.01, "batch_size": 32}
    assert env["HPSEARCH_TRIAL_NUMBER"] == "4" and env["OMP_NUM_THREADS"] == "2"
    assert command_argv(spec, on_gpu) == [sys.executable, "t.py", "0.01", "cuda:0", "32"]
    on_cpu = Trial(number=5, study_name="x", params={"lr": 0.01, "batch_size": 32})
    assert command_env(spec, on_cpu)["CUDA_VISIBLE_DEVICES"] == ""


# --------------------------------------------------------------------------- the study file


def test_a_trainer_study_may_name_any_knob_and_metric():
    spec = parse_spec({"name": "x", "trainer": "pkg.train:fit",
                       "objective": {"metric": "f1", "direction": "maximize"},
                       "fixed": {"dataset_path": "/data"},
                       "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True},
                                 "layers": {"low": 1, "high": 4, "int": True},
                                 "act": {"choices": ["relu", "gelu"]},
                                 "dropout": {"low": 0.0, "high": 0.5,
                                             "when": {"act": "gelu"}}},
                       "enqueue": [{"lr": 0.01, "layers": 2, "act": "gelu", "dropout": 0.1}]})
    assert spec.trainer.function == "pkg.train:fit" and spec.objective.direction == "maximize"
    assert spec.space["layers"].is_int
    with pytest.raises(SpecError, match=r"enqueue\[0\].layers: expected an integer"):
        parse_spec({**spec.model_dump(mode="json"), "enqueue": [{"layers": 2.5}]})


@pytest.mark.parametrize("changes, message", [
    ({"data": {"dataset": "mnist"}}, "data: goes with the built-in trainer"),
    ({"trainer": "no_colon"}, "trainer.function: expected an import path"),
    ({"trainer": {"command": ["python", "t.py", "--lr", "{lrr}"]}},
     r"trainer.command\[3\]: \{lrr\} names no parameter, did you mean 'lr'"),
    ({"trainer": {"command": []}}, "trainer.command: expected the program"),
    ({"trainer": {"function": "a:b", "command": ["x"]}}, "trainer: expected a function"),
    ({"trainer": {"function": "a:b", "trial_timeout_s": 5}},
     "trainer.trial_timeout_s: goes with command"),
    ({"trainer": {"command": ["x"], "trial_timeout_s": -1}},
     "trainer.trial_timeout_s: expected a positive number"),
    ({"space": {"lr": {"auto": True}}}, "space.lr.auto: the LR range test runs the built-in"),
    ({"fixed": {"lr": 0.1}}, "fixed.lr: also searched as space.lr"),
])
def test_bad_trainer_settings_name_the_key(changes, message):
    base = {"name": "x", "trainer": "pkg.train:fit", "objective": {"metric": "loss"},
            "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}
    with pytest.raises(SpecError, match=message):
        parse_spec({**base, **changes})


def test_the_built_in_trainer_still_checks_its_metrics():
    with pytest.raises(SpecError, match="objective.metric: expected a metric, one of"):
        parse_spec({"name": "x", "data": {}, "model": {}, "objective": {"metric": "f1"},
                    "space": {"lr": {"low": 1e-4, "high": 1e-1}}})


def test_validate_imports_the_function_and_finds_the_program(tmp_path):
    study_file(tmp_path, trainer="usercode:fti")
    bad = hp("validate", "mine.yaml", cwd=tmp_path)
    assert bad.returncode == 2 and "module 'usercode' has no attribute 'fti'" in bad.stderr
    study_file(tmp_path, trainer="nomodule:fit")
    bad = hp("validate", "mine.yaml", cwd=tmp_path)
    assert bad.returncode == 2 and "cannot import 'nomodule'" in bad.stderr
    study_file(tmp_path, trainer={"command": ["no-such-program-here", "{lr}"]})
    for command in ("validate", "run"):
        bad = hp(command, "mine.yaml", cwd=tmp_path)
        assert bad.returncode == 2, bad.stderr
        assert "trainer.command[0]: no-such-program-here: not found" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hpsearch.db").exists()  # refused before the storage is touched


# --------------------------------------------------------------------------- through the CLI


def test_a_function_study_runs_with_two_workers_and_every_view_reads_it(tmp_path):
    study_file(tmp_path, trainer="usercode:final", fixed={"penalty": 0.5, "sleep": 0.2})
    run = hp("run", "mine.yaml", "--workers", "2", "--gpus", "none", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    storage = optuna.load_study(study_name="mine",
                                storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")._storage
    for t in trials:
        history = t.user_attrs["history"]
        assert [r["epoch"] for r in history] == [1, 2, 3] and set(history[0]) == {
            "epoch", "score", "acc"}
        expected = (math.log10(t.params["lr"]) + 2) ** 2 + 1 / 3 + 0.5
        assert t.value == pytest.approx(expected)
        assert t.user_attrs["batch_size"] in (16, 32, 64, 128)  # real values beside log2_
        names = {m.filename for m in get_all_artifact_meta(t, storage=storage)}
        assert names == {"curves.svg", "metrics.json"}
    status = json.loads(hp("status", "mine", "--json", cwd=tmp_path).stdout)
    assert status["counts"]["complete"] == 6
    best = yaml.safe_load(hp("best", "mine", cwd=tmp_path).stdout)
    assert best["trainer"] == {"function": "usercode:final"} and best["fixed"] == {
        "penalty": 0.5, "sleep": 0.2}
    assert hp("report", "mine", "--out", "r.html", cwd=tmp_path).returncode == 0
    assert "score per epoch" in (tmp_path / "r.html").read_text()
    retrain = hp("retrain", "mine", "--seeds", "2", cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr
    results = json.loads((tmp_path / "retrain-mine" / "results.json").read_text())
    assert results["test_score"]["per_seed"] == [0.5, 1.5]
    assert not list((tmp_path / "checkpoints" / "mine").glob("trial-*/state.pt"))

    results = search.load_results("mine", storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    best_row = min(results.trials, key=lambda r: r["score"])
    assert results.best_value == best_row["score"] and results.best_params["penalty"] == 0.5
    assert "log2_batch_size" not in best_row and best_row["batch_size"] in (16, 32, 64, 128)


@pytest.mark.parametrize("function, state, reason", [
    ("raises", "FAIL", "error: RuntimeError: boom at lr"),
    ("silent", "FAIL", "never reported the objective metric 'score' (reported: other)"),
    ("nan", "PRUNED", "diverged: score is nan at epoch 2"),
    ("returns_nan", "PRUNED", "diverged: score is nan"),
    ("backwards", "FAIL", "error: ValueError: report: epoch 1 after epoch 2"),
    ("not_a_number", "FAIL",
     "error: ValueError: report: metric 'score' at epoch 1 is 'low', expected a number"),
])
def test_what_user_code_does_wrong_is_the_trials_reason(tmp_path, function, state, reason):
    study_file(tmp_path, trainer=f"usercode:{function}", budget={"trials": 2, "epochs": 3},
               run={"max_failures_in_row": 2})
    run = hp("run", "mine.yaml", cwd=tmp_path)
    trials = trials_of(tmp_path)
    assert {t.state.name for t in trials} == {state}, [t.user_attrs for t in trials]
    assert all(t.user_attrs["ended"].startswith(reason) for t in trials), trials[0].user_attrs
    if state == "FAIL":
        assert run.returncode != 0 and len(trials) == 2  # stopped after 2 in a row
    if function == "raises":
        assert "Traceback" in trials[0].user_attrs["traceback"]
        assert trials[0].user_attrs["history"] == [{"epoch": 1, "score": 1.0}]


def test_a_function_that_reports_an_epoch_twice_completes_warned_once(tmp_path):
    study_file(tmp_path, trainer="usercode:twice", budget={"trials": 2, "epochs": 2})
    run = hp("run", "mine.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all([r["epoch"] for r in t.user_attrs["history"]] == [1, 2] for t in trials)
    for t in trials:
        assert run.stderr.count(f"trial #{t.number}: epoch 2 was reported already") == 1


def test_a_pruned_report_stops_the_trial_even_when_the_code_catches_it(tmp_path):
    study_file(tmp_path, trainer="usercode:swallows", budget={"trials": 8, "epochs": 3},
               pruner={"type": "median", "options": {"n_startup_trials": 2,
                                                     "n_warmup_steps": 0}})
    assert hp("run", "mine.yaml", cwd=tmp_path).returncode == 0
    trials = trials_of(tmp_path)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs["ended"].startswith("pruned at epoch") for t in pruned)


def command_study(tmp_path: Path, mode: str, **changes) -> Path:
    trainer = {"command": [sys.executable, "script.py", "{lr}", "{epochs}", mode],
               "kill_grace_s": 1, **changes.pop("trainer", {})}
    return study_file(tmp_path, trainer=trainer, **changes)


def test_a_command_study_runs_with_two_workers_and_keeps_its_output(tmp_path):
    command_study(tmp_path, "ok", fixed={})
    run = hp("run", "mine.yaml", "--workers", "2", "--gpus", "none", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    storage = optuna.load_study(study_name="mine",
                                storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")._storage
    for t in trials:
        assert t.value == pytest.approx((t.params["lr"] - 0.01) ** 2 + 1 / 3)
        names = {m.filename for m in get_all_artifact_meta(t, storage=storage)}
        assert names == {"curves.svg", "metrics.json", "output.txt"}
    retrain = hp("retrain", "mine", cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr
    results = json.loads((tmp_path / "retrain-mine" / "results.json").read_text())
    assert results["test_score"]["mean"] == 0.25 and results["seed"]["per_seed"] == [0.0]


@pytest.mark.parametrize("mode, reason", [
    ("fail", "command failed (exit code 3): CUDA error: something went wrong"),
    ("garbage", "error: report line is not JSON"),
    ("hang", "timed out after 2 s (trainer.trial_timeout_s)"),
])
def test_a_command_that_fails_is_the_trials_reason(tmp_path, mode, reason):
    command_study(tmp_path, mode, trainer={"trial_timeout_s": 2},
                  budget={"trials": 1, "epochs": 3}, run={"max_failures_in_row": 1})
    run = hp("run", "mine.yaml", cwd=tmp_path)
    assert run.returncode != 0
    (trial,) = trials_of(tmp_path)
    assert trial.state == TrialState.FAIL and trial.user_attrs["ended"].startswith(reason)
    assert "training epoch 1" in trial.user_attrs["output_tail"]
    # a hung command is cut at its timeout, not at the end of its 600 s sleep
    assert (trial.datetime_complete - trial.datetime_start).total_seconds() < 300


def test_a_stopped_command_is_killed_with_its_process_group(tmp_path):
    """SIGTERM first; a script that ignores it gets SIGKILL after kill_grace_s."""
    for mode in ("pidfile", "stubborn"):
        pidfile = tmp_path / f"{mode}.pid"
        command_study(tmp_path, mode, name=mode, trainer={"trial_timeout_s": 2,
                                                          "env": {"PIDFILE": str(pidfile)}},
                      budget={"trials": 1, "epochs": 3}, run={"max_failures_in_row": 1})
        hp("run", f"{mode}.yaml", cwd=tmp_path)
        (trial,) = trials_of(tmp_path, mode)
        assert trial.state == TrialState.FAIL and "timed out" in trial.user_attrs["ended"]
    pid = int((tmp_path / "pidfile.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_command_dies_with_its_worker_and_python_is_the_workers_own(tmp_path):
    """kill -9 of the worker takes its script along (no orphan keeps the GPU); `python` runs
    the worker's interpreter even where PATH has no python that imports search."""
    pidfile = tmp_path / "script.pid"
    study_file(tmp_path, trainer={"command": ["python", "script.py", "{lr}", "{epochs}",
                                              "pidfile"], "env": {"PIDFILE": str(pidfile)}},
               budget={"trials": 1, "epochs": 3})
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no virtualenv on it
    worker = subprocess.Popen([HPSEARCH, "run", "mine.yaml"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        script = int(pidfile.read_text())
        os.kill(worker.pid, 9)
        worker.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(script, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(script, 9)
            raise AssertionError("the script outlived its killed worker")
    finally:
        if worker.poll() is None:
            worker.kill()


def test_tune_runs_a_study_from_python_with_a_function_object(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usercode.py").write_text(CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usercode

    url = f"sqlite:///{tmp_path / 'api.db'}"
    results = search.tune({"name": "api", "trainer": usercode.fit,
                           "objective": {"metric": "score"}, "budget": {"trials": 3,
                                                                        "epochs": 2},
                           "sampler": {"type": "random", "seed": 1},
                           "pruner": {"type": "none"},
                           "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}},
                          storage=url, show_progress=False)
    assert results.counts["complete"] == 3 and len(results.trials) == 3
    assert results.best_value == min(r["score"] for r in results.trials)
    stored = search.load_results("api", storage=url)
    assert stored.best_params == results.best_params
    frame = stored.dataframe()
    assert len(frame) == 3 and frame["score"].min() == results.best_value
    assert {"trial", "state", "lr", "epochs_run"} <= set(frame.columns)


def test_dataframe_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    results = search.Results("s", ["loss"], ["minimize"], None, None, None)
    with pytest.raises(search.SearchError, match=r"pip install 'hpsearch\[pandas\]'"):
        results.dataframe()


def test_the_documented_report_line_is_what_the_helper_prints(capsys):
    search.report(3, val_loss=0.2512, val_accuracy=0.91)
    printed = capsys.readouterr().out.strip()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "own-training.md").read_text()
    assert printed in doc
