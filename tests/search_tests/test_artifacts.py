"""Per-trial artifacts and the study note: real worker, real SQLite, real artifact store."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

import trainers
from search._errors import SpecError
from search.run import create_or_load
from search.spec import parse_spec
from search.storage import (
    artifact_location,
    open_artifact_store,
    open_storage,
    quiet_optuna_warnings,
)
from search.storage._artifact_store import ENV_VAR, _PrefixedStore
from search.trial import ArtifactRecorder, write_study_note
from search.trial._artifacts import lr_per_step
from search.trial._charts import curves_svg, grad_norms_svg, lr_svg
from search.workers import run_worker
from tests.search_tests.studies import OPTIMIZER_LR_BATCH, SGD_MOMENTUM, searched
from trainers._loop import data_for

quiet_optuna_warnings()
FILES = {"curves.svg", "lr.svg", "grad_norms.svg", "metrics.json"}

def spec_data(name: str, tmp_path: Path, **changes) -> dict:
    return searched(name, tmp_path, **{"space": {**OPTIMIZER_LR_BATCH, **SGD_MOMENTUM}, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A study of complete and pruned trials, run by the real worker into SQLite."""
    tmp = tmp_path_factory.mktemp("artifacts")
    url = f"sqlite:///{tmp / 'studies.db'}"
    spec = parse_spec(spec_data("art", tmp))
    study = create_or_load(spec, open_storage(url))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV_VAR, raising=False)
        run_worker(study, spec, device="cpu")
    return study, spec, tmp

def _download(study: optuna.Study, store_dir: Path, trial: optuna.trial.FrozenTrial
              ) -> dict[str, bytes]:
    store = open_artifact_store(str(store_dir))
    out = {}
    for meta in get_all_artifact_meta(trial, storage=study._storage):
        with store.open_reader(meta.artifact_id) as f:
            out[meta.filename] = f.read()
    return out

def test_every_trained_trial_has_artifacts_that_match_its_metrics(finished):
    study, spec, tmp = finished
    store_dir = tmp / "studies.db.artifacts"  # next to the database by default
    assert store_dir.is_dir()
    states = {t.state for t in study.trials}
    assert {TrialState.COMPLETE, TrialState.PRUNED} <= states  # both kinds are covered
    for t in study.trials:
        metas = get_all_artifact_meta(t, storage=study._storage)
        assert {m.filename for m in metas} == FILES, t.number
        assert {m.filename: m.mimetype for m in metas}["curves.svg"] == "image/svg+xml"
        files = _download(study, store_dir, t)
        metrics = json.loads(files["metrics.json"])
        assert metrics["history"] == t.user_attrs["history"]  # the raw per-epoch history
        assert metrics["trial"] == t.number and metrics["ended"] == t.user_attrs["ended"]
        assert metrics["epochs_run"] == len(t.user_attrs["history"])
        for name in ("curves.svg", "lr.svg", "grad_norms.svg"):
            root = ET.fromstring(files[name])  # well-formed SVG with a drawn curve
            assert root.tag.endswith("svg")
            assert root.iter("{http://www.w3.org/2000/svg}polyline") or len(metrics["history"]) == 1
        assert f"trial #{t.number}" in files["curves.svg"].decode()
        assert t.user_attrs["artifact_seconds"] < 1.0

def test_pruned_trial_curves_stop_short_of_the_budget(finished):
    study, spec, tmp = finished
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    t = pruned[0]
    svg = _download(study, tmp / "studies.db.artifacts", t)["curves.svg"].decode()
    assert "pruned at epoch" in svg  # the title says why it ended
    # x axis spans the whole budget: its last tick is the last epoch, beyond the run's points
    assert f">{spec.budget.epochs}</text>" in svg
    assert len(t.user_attrs["history"]) < spec.budget.epochs

def test_study_note_describes_the_study_and_is_kept_once_edited(finished):
    from optuna_dashboard import get_note, save_note

    study, spec, tmp = finished
    note = get_note(study)
    assert note.startswith("## art")
    assert "hpsearch worker art --storage sqlite:///" in note  # how to reproduce
    assert "| `lr` | `{low: 0.001, high: 1.0, log: true}` |" in note  # the search space
    assert "```yaml" in note and "dataset: synthetic" in note  # the study file
    save_note(study, "my own notes")
    assert not write_study_note(study, spec)  # a person's note is theirs
    assert get_note(study) == "my own notes"
    assert write_study_note(study, spec, overwrite=True)
    assert get_note(study).startswith("## art")

@pytest.mark.parametrize("schedule", sorted(trainers.LR_SCHEDULES.names()))
def test_lr_per_step_is_what_the_trainer_applied(schedule):
    """The recomputed trajectory equals the lr (and momentum) the run recorded at each epoch end."""
    extra = {"patience": 0} if schedule == "plateau" else {}
    config = trainers.config_from_dict({
        "data": {"dataset": "synthetic", "size": 512}, "model": {"type": "mlp", "hidden": [8]},
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
        "schedule": {"name": schedule, "warmup_epochs": 0.5, **extra},
        "batch_size": 64, "epochs": 6, "device": "cpu", "seed": 1,
    })
    result = trainers.train(config, None)
    n_train = int(data_for(config).train.x.shape[0])
    x, lr, momentum = lr_per_step(config, list(result.history), n_train)
    ends = {round(v, 9): k for k, v in enumerate(x)}
    assert x == sorted(x) and x[-1] == pytest.approx(len(result.history))
    for m in result.history:
        k = ends[m.epoch]
        assert lr[k] == pytest.approx(m.lr, rel=1e-9), (schedule, m.epoch)
        assert momentum is not None and momentum[k] == pytest.approx(m.momentum, rel=1e-9)

def test_lr_per_step_follows_a_real_plateau_cut():
    config = trainers.config_from_dict({
        "data": {"dataset": "synthetic", "size": 256}, "model": {"type": "mlp", "hidden": [8]},
        "optimizer": {"name": "adam", "lr": 3.0}, "schedule": {"name": "plateau", "patience": 0},
        "batch_size": 64, "epochs": 5, "device": "cpu", "divergence_factor": 1e9,
    })
    result = trainers.train(config, None)
    lrs = [m.lr for m in result.history]
    assert len(set(lrs)) > 1, "the setup should make plateau cut the lr"
    x, lr, momentum = lr_per_step(config, list(result.history), 256 - round(0.2 * 256))
    assert momentum is not None  # adam's beta1, constant
    for m in result.history:
        assert lr[x.index(float(m.epoch))] == pytest.approx(m.lr)

def test_artifacts_that_cannot_be_written_never_fail_the_trial(tmp_path, caplog):
    class Broken:
        def write(self, artifact_id, content_body):
            raise OSError("disk full")

    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(spec_data("broken", tmp_path, budget={"trials": 2, "epochs": 1},
                                pruner={"type": "none"}))
    study = create_or_load(spec, open_storage(url))
    run_worker(study, spec, device="cpu",
               artifacts=ArtifactRecorder(Broken(), location="/nowhere"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all("artifact_seconds" not in t.user_attrs for t in study.trials)
    warned = [r.getMessage() for r in caplog.records
              if r.name == "hpsearch.trial" and r.levelno == logging.WARNING]
    assert sum("artifacts not recorded in /nowhere (OSError: disk full)" in m
               for m in warned) == 2

def test_artifacts_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "off")
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(spec_data("off", tmp_path, budget={"trials": 1, "epochs": 1}))
    study = create_or_load(spec, open_storage(url))
    run_worker(study, spec, device="cpu")
    assert get_all_artifact_meta(study.trials[0], storage=study._storage) == []
    assert not (tmp_path / "s.db.artifacts").exists()

def test_artifact_location(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert artifact_location("sqlite:///runs/hp.db") == "runs/hp.db.artifacts"
    assert artifact_location("postgresql+psycopg2://u:pw@db/x") == "hpsearch-artifacts"
    assert artifact_location(None) == "hpsearch-artifacts"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "shared"))
    assert artifact_location("sqlite:///hp.db") == str(tmp_path / "shared")
    monkeypatch.setenv(ENV_VAR, "OFF")
    assert artifact_location("sqlite:///hp.db") is None
    with pytest.raises(SpecError, match=f"{ENV_VAR}: expected a directory, s3://bucket/prefix "
                                        "or off, got 'gs://b/p'"):
        open_artifact_store("gs://b/p")
    try:
        import boto3  # noqa: F401
    except ImportError:
        with pytest.raises(SpecError, match="s3://bucket/runs: an s3:// artifact store needs "
                                            "boto3"):
            open_artifact_store("s3://bucket/runs")
    store = open_artifact_store(str(tmp_path / "new" / "dir"))  # created when missing
    store.write("a", io.BytesIO(b"x"))
    assert (tmp_path / "new" / "dir" / "a").read_bytes() == b"x"

def test_prefixed_store_keeps_keys_under_the_prefix():
    class Memory:
        def __init__(self):
            self.data = {}

        def write(self, key, body):
            self.data[key] = body.read()

        def open_reader(self, key):
            return io.BytesIO(self.data[key])

        def remove(self, key):
            del self.data[key]

    memory = Memory()
    store = _PrefixedStore(memory, "/team/runs/")
    store.write("id1", io.BytesIO(b"png"))
    assert memory.data == {"team/runs/id1": b"png"}
    assert store.open_reader("id1").read() == b"png"
    store.remove("id1")
    assert memory.data == {}

def test_charts_survive_missing_and_odd_values():
    history = [
        {"epoch": 1, "train_loss": math.nan, "val_loss": None, "train_accuracy": 0.1,
         "val_accuracy": None, "grad_norms": {"linear1": 0.0, "linear2": math.inf}},
        {"epoch": 2, "train_loss": 2.0, "val_loss": 1e6, "train_accuracy": 0.2,
         "val_accuracy": 0.2, "grad_norms": {"linear1": 1e-12, "linear2": 3.0}},
    ]
    many = [{"epoch": 1, "grad_norms": {f"conv{k}": 10.0 ** -k for k in range(12)}}]
    for svg in (curves_svg(history, 10, "t <&> \"q\""), curves_svg([], 3, "empty"),
                lr_svg([], [], None, 3, "no steps"), lr_svg([0.5, 1.0], [0.1, 0.1], [0.9, 0.9],
                                                            1, "flat"),
                grad_norms_svg(history, 10, "odd"), grad_norms_svg(many, 3, "many"),
                grad_norms_svg([{"epoch": 1, "grad_norms": {}}], 1, "none")):
        root = ET.fromstring(svg)  # well-formed and escaped
        assert root.get("viewBox") == "0 0 480 270"
        coords = re.findall(r' (?:points|cx|cy|x|y|x1|y1|x2|y2|width|height)="([^"]*)"', svg)
        assert coords and not [c for c in coords if "nan" in c or "inf" in c]
