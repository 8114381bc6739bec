"""The study in MLflow, TensorBoard and W&B (`tracking:`), read back with each one's own reader.

MLflow is a real `mlflow server` (SQLite backend) started here on loopback, read back with
`MlflowClient`; TensorBoard's event files are read with TensorBoard's `EventAccumulator`; W&B
runs offline and its run files (``run-*.wandb``: W&B's records, in W&B's protobuf schema) are
read back record by record. Every value is compared with what the study storage holds.
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search._errors import SpecError
from search._process import free_port
from search.spec import parse_spec
from search.storage import TRACKING_ATTR
from search.tracking import Tracker, TrialRecord, record_of
from tests import servers
from tests.search_tests.studies import run_killing_a_worker, study_data

BIN = Path(sys.executable).parent
HPSEARCH = str(BIN / "hpsearch")

# Loss (x-1)^2 + 1/epoch; a checkpoint each epoch, so a killed trial's retry resumes.
TRAIN = '''
import time


def fit(params, trial):
    x = params["x"]
    state = trial.load_checkpoint()
    for epoch in range(state["epoch"] + 1 if state else 1, trial.epochs + 1):
        time.sleep(float(params.get("pause", 0.3)))
        loss = (x - 1) ** 2 + 1.0 / epoch
        trial.report(epoch, loss=loss, size=abs(x) * 10)
        trial.save_checkpoint({"epoch": epoch})
    return {"loss": loss}
'''


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback with a SQLite backend: its URL."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def project(tmp_path: Path, name: str, tracking: dict | None, **changes) -> Path:
    (tmp_path / "mytrain.py").write_text(TRAIN)
    study = {"name": name, "trainer": "mytrain:fit", "objective": {"metric": "loss"},
             "budget": {"trials": 8, "epochs": 4}, "sampler": {"type": "random", "seed": 3},
             "pruner": {"type": "threshold", "options": {"upper": 3.0}},
             "space": {"x": {"low": -2.0, "high": 3.0}}, "fixed": {"note": "hello"},
             "enqueue": [{"x": -2.0}],  # (x-1)^2 + 1 > 3 at epoch 1: pruned there
             "run": {"heartbeat_interval": 1, "grace_period": 3}, **changes}
    if tracking is not None:
        study["tracking"] = tracking
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return tmp_path


def hp(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd), "WANDB_SILENT": "true"}
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def stored(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'hpsearch.db'}")


def history(trial: optuna.trial.FrozenTrial) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (epoch, value) as the study storage holds them."""
    out: dict[str, list[tuple[int, float]]] = {}
    for report in trial.user_attrs["history"]:
        for key, value in report.items():
            if key != "epoch":
                out.setdefault(key, []).append((report["epoch"], value))
    return out


# --- W&B's run file: a LevelDB-style log of W&B's protobuf records --------------------------

def wandb_records(path: str):
    """Each record of an offline run file, parsed with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and pieces:  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_run(path: str) -> dict:
    """config, summary and history (step -> metrics) of one offline W&B run."""
    run: dict = {"config": {}, "summary": {}, "history": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
            run["config"].update({u.key: json.loads(u.value_json)
                                  for u in record.run.config.update})
        elif kind == "summary":
            run["summary"].update({u.key or ".".join(u.nested_key): json.loads(u.value_json)
                                   for u in record.summary.update})
        elif kind == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            run["history"][record.history.step.num] = items
    return run


# --- the end-to-end study ----------------------------------------------------------------

def check_mlflow(url: str, study: optuna.Study, logged: list, retry: tuple[int, int]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hpsearch.kind") == "study"]
    assert len(parents) == 1, "the two workers share one parent run"
    parent = parents[0].info.run_id
    assert study.user_attrs[TRACKING_ATTR]["mlflow"]["run_id"] == parent
    # The study's settings as its params; ended with the best trial when the budget was met.
    assert parents[0].data.params["sampler"] == "random"
    assert parents[0].data.params["space.x"] == '{"low": -2.0, "high": 3.0, "log": false}'
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best.loss"] == study.best_value
    assert parents[0].data.tags["hpsearch.best_trial"] == str(study.best_trial.number)
    by_trial = {int(r.data.tags["hpsearch.trial"]): r for r in runs
                if r.data.tags.get("hpsearch.kind") == "trial"}
    for trial in logged:
        run = by_trial[trial.number]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent
        assert tags["hpsearch.study"] == study.study_name
        assert tags["hpsearch.state"] == trial.state.name
        assert run.data.params == {"x": str(trial.params["x"]), "note": "hello"}
        for key, points in history(trial).items():
            got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(got) == points, (trial.number, key)
        if trial.state == TrialState.PRUNED:
            assert tags["hpsearch.pruned_at_epoch"] == str(max(trial.intermediate_values))
            assert "objective.loss" not in run.data.metrics
        else:
            assert run.data.metrics["objective.loss"] == trial.value
    retried, dead = retry
    assert by_trial[retried].data.tags["hpsearch.retry_of"] == str(dead)
    assert by_trial[retried].info.run_name == f"trial {retried} (retry of {dead})"
    finals = [r for r in runs if r.data.tags.get("hpsearch.kind") == "retrain"]
    assert len(finals) == 1 and finals[0].data.tags["mlflow.parentRunId"] == parent
    assert finals[0].data.metrics["objective.loss"] == pytest.approx(
        study.user_attrs["hpsearch_retrain"]["loss"]["mean"])


def check_tensorboard(folder: Path, logged: list) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for trial in logged:
        events = EventAccumulator(str(folder / f"trial-{trial.number}"))
        events.Reload()
        for key, points in history(trial).items():
            got = [(e.step, e.value) for e in events.Scalars(key)]
            assert [s for s, _ in got] == [s for s, _ in points]
            assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["x"].number_value == pytest.approx(trial.params["x"])
        assert start.hparams["note"].string_value == "hello"
        assert start.hparams["hpsearch.state"].string_value == trial.state.name
        final = events.Scalars("final/loss")[-1].value
        assert final == pytest.approx(trial.user_attrs["history"][-1]["loss"], rel=1e-6)


def check_wandb(folder: Path, name: str, logged: list) -> None:
    runs = [wandb_run(p) for p in glob.glob(str(folder / "wandb" / "offline-run-*" /
                                                 "run-*.wandb"))]
    by_trial = {r["summary"]["hpsearch.trial"]: r for r in runs
                if "hpsearch.trial" in r["summary"] and r["name"].startswith("trial")}
    for trial in logged:
        run = by_trial[trial.number]
        assert run["group"] == name
        assert run["config"]["x"] == trial.params["x"] and run["config"]["note"] == "hello"
        assert run["summary"]["hpsearch.state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert run["summary"]["objective.loss"] == trial.value
        for key, points in history(trial).items():
            assert [(step, run["history"][step][key]) for step, _ in points] == points


@pytest.mark.serial
def test_every_trial_is_logged_to_mlflow_tensorboard_and_wandb(tmp_path, mlflow_server):
    """Two workers, a pruned trial, a worker killed mid-trial (its retry logged as one), and
    the retrain: each run read back and compared with the study storage."""
    name = "tracked"
    tracking = {"mlflow": {"uri": mlflow_server}, "tensorboard": "tb",
                "wandb": {"mode": "offline", "dir": "wb"}}
    cwd = project(tmp_path, name, tracking)
    env = {**os.environ, "PYTHONPATH": str(cwd), "WANDB_SILENT": "true"}
    dead, _, out = run_killing_a_worker(cwd, lambda n, last: last is not None and last >= 2,
                                        env=env)
    study = stored(cwd, name)
    trials = study.get_trials(deepcopy=False)
    dead_pid = trials[dead].user_attrs["pid"]
    retried = next(t.number for t in trials
                   if t.system_attrs.get("failed_trial") == trials[dead].number)
    # What the killed worker told before it died may have died in its queue with it: only
    # the trials the surviving worker told are sure to be logged.
    logged = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
              and t.user_attrs.get("pid") != dead_pid]
    assert any(t.state == TrialState.PRUNED for t in logged), out
    assert any(t.number == retried for t in logged), out
    retrain = hp("retrain", name, "--storage", "sqlite:///hpsearch.db", cwd=cwd)
    assert retrain.returncode == 0, retrain.stdout + retrain.stderr
    study = stored(cwd, name)
    logged = [study.trials[t.number] for t in logged]
    check_mlflow(mlflow_server, study, logged, (retried, dead))
    check_tensorboard(cwd / "tb" / name, logged)
    check_wandb(cwd / "wb", name, logged)


@pytest.mark.serial
def test_a_stopped_mlflow_server_is_a_warning_per_trial_and_no_stall(tmp_path):
    """The same study with MLflow down (nothing listens on its port) completes, says which
    trials were not logged, and takes about as long as untracked (median of 3 rounds)."""
    down = {"mlflow": {"uri": f"http://127.0.0.1:{free_port()}"}}
    seconds: dict[str, list[float]] = {"untracked": [], "down": []}
    outputs = {}
    for round_ in range(2):
        for arm in ("untracked", "down"):  # alternated: the machine's load hits both
            cwd = tmp_path / f"{arm}{round_}"
            cwd.mkdir()
            # Six 1.6 s trials, a short quick-start study: the worker's one fixed cost, MLflow's
            # import (about 1 s of CPU, beside the trials), is counted in.
            project(cwd, arm, down if arm == "down" else None, enqueue=[],
                    fixed={"pause": 0.4}, budget={"trials": 6, "epochs": 4},
                    pruner={"type": "none"})
            start = time.monotonic()
            run = hp("run", "study.yaml", "--gpus", "none", cwd=cwd)
            seconds[arm].append(time.monotonic() - start)
            assert run.returncode == 0, run.stdout + run.stderr
            outputs[arm] = run.stdout + run.stderr
            assert [t.state.is_finished() for t in stored(cwd, arm).trials] == [True] * 6
    said = outputs["down"]
    assert "warning: trial #0: not logged to mlflow" in said and "connection refused" in said
    assert "warning: tracking: 6 of 6 trial(s) not logged to mlflow" in said
    ratio = statistics.median(seconds["down"]) / statistics.median(seconds["untracked"])
    assert ratio < 1.10, seconds


COMMAND = """
import json, sys
x = float(sys.argv[1])
for epoch in (1, 2):
    print("@hpsearch " + json.dumps({"epoch": epoch, "loss": (x - 1) ** 2 + 1 / epoch}))
"""


@pytest.mark.parametrize("kind", ["packed", "command"])
def test_packed_and_command_trials_are_logged_as_any_other(tmp_path, kind):
    """The runner logs every kind of trial: two built-in trials trained as one pack, and a
    program's trials (TensorBoard: no server to wait for)."""
    if kind == "packed":
        study = study_data(kind, trials=2, epochs=2, size=256,
                           run={"pack": 2}, tracking={"tensorboard": "tb"})
        metric = "val_loss"
    else:
        (tmp_path / "fit.py").write_text(COMMAND)
        study = {**BASE, "name": kind, "trainer": {"command": ["python", "fit.py", "{x}"]},
                 "budget": {"trials": 2, "epochs": 2}, "pruner": {"type": "none"},
                 "tracking": {"tensorboard": "tb"}}
        metric = "loss"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    run = hp("run", "study.yaml", "--gpus", "none", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tracking: 2 trial(s) logged to tensorboard" in run.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for trial in stored(tmp_path, kind).trials:
        events = EventAccumulator(str(tmp_path / "tb" / kind / f"trial-{trial.number}"))
        events.Reload()
        reports = trial.user_attrs["history"]
        scalars = events.Scalars(metric)
        assert [e.step for e in scalars] == [r["epoch"] for r in reports]
        assert [e.value for e in scalars] == pytest.approx([r[metric] for r in reports],
                                                           rel=1e-5)
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


# --- fast: the spec, the record, a tracker that fails ------------------------------------

BASE = {"name": "t", "trainer": "m:f", "objective": {"metric": "loss"},
        "space": {"x": {"low": 0.0, "high": 1.0}}}


def test_tracking_names_a_tracker_that_is_installed(monkeypatch):
    """Each key's bad values are in test_bad_study_values; here, the section as a whole."""
    with pytest.raises(SpecError, match="tracking: expected at least one of: mlflow, "
                                        "tensorboard, wandb"):
        parse_spec({**BASE, "tracking": {}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where it is not installed
    with pytest.raises(SpecError, match=r"tracking\.wandb: needs the wandb package, not "
                                        r"installed here: pip install 'hpsearch\[wandb\]'"):
        parse_spec({**BASE, "tracking": {"wandb": {"mode": "offline"}}})


def test_a_trial_record_holds_every_reported_number_per_epoch():
    spec = parse_spec({**BASE, "fixed": {"layers": [64, 32]}})
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    trial = create_trial(
        state=TrialState.PRUNED, params={"x": 0.5},
        distributions={"x": FloatDistribution(0.0, 1.0)},
        intermediate_values={1: 0.9, 2: 0.8},
        user_attrs={"ended": "pruned at epoch 2", "history": [
            {"epoch": 1, "loss": 0.9, "val_accuracy": None, "grad_norms": {"fc": 1.5}},
            {"epoch": 2, "loss": 0.8, "val_accuracy": None, "grad_norms": {"fc": 0.5}}]})
    trial.number = 7
    trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(
        seconds=3)
    record = record_of(trial, spec, retry_of=4)
    assert record.epochs == [(1, {"loss": 0.9, "grad_norms.fc": 1.5}),
                             (2, {"loss": 0.8, "grad_norms.fc": 0.5})]
    assert record.params == {"layers": [64, 32], "x": 0.5}
    assert (record.state, record.pruned_at, record.values) == ("PRUNED", 2, {})
    assert record.run_name == "trial 7 (retry of 4)" and record.reason == "pruned at epoch 2"
    assert record.millis(record.end) - record.millis(record.start) == 3000
    assert record.last_metrics == {"loss": 0.8, "grad_norms.fc": 0.5}


def test_a_tracker_that_fails_is_a_warning_per_trial_and_a_count(tmp_path, caplog):
    """TensorBoard's folder is a file: each trial is one warning, the first a real failure,
    the rest skipped while it is down; the worker's last line counts them."""
    (tmp_path / "tb").write_text("a file, not a folder")
    spec = parse_spec({**BASE, "tracking": {"tensorboard": str(tmp_path / "tb")}})
    tracker = Tracker.for_study(optuna.create_study(), spec)
    assert tracker is not None
    for number in range(3):
        tracker.log(TrialRecord(study="t", number=number, state="COMPLETE", params={"x": 1},
                                values={"loss": 1.0}, epochs=[(1, {"loss": 1.0})]))
    started = time.monotonic()
    with caplog.at_level("INFO", logger="hpsearch.tracking"):
        tracker.close()
    assert time.monotonic() - started < 10
    lines = [r.getMessage() for r in caplog.records if r.name == "hpsearch.tracking"]
    assert [line.split(":")[0] for line in lines[:3]] == ["trial #0", "trial #1", "trial #2"]
    assert all("not logged to tensorboard" in line for line in lines), lines
    assert "it is asked again 30 s after it failed" in lines[1]
    assert lines[-1].startswith("tracking: 3 of 3 trial(s) not logged to tensorboard"), lines
    assert math.isfinite(tracker.tallies["tensorboard"].down_until)
