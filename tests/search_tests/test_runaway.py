"""No runaway loops: a trial without a usable value is a failure that counts, and what the file
already shows is refused before the storage is touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

import search.trial._objective as objective_module
from search.run import create_or_load
from search.spec import parse_spec
from search.storage import open_storage
from search.workers import WorkerError, run_worker
from tests.search_tests.studies import study_data

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))


def test_a_nan_final_value_fails_counts_and_stops_the_worker(tmp_path, monkeypatch):
    spec = parse_spec(study_data("nan", trials=20, epochs=1, size=128,
                                 run={"max_failures_in_row": 3}))
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    monkeypatch.setattr(objective_module, "metric_value", lambda metric, history: float("nan"))
    shown = []
    with pytest.raises(WorkerError, match="3 trials failed in a row"):
        run_worker(study, spec, device="cpu", artifacts=False,
                   on_trial=lambda s, outcome: shown.append(outcome.state))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3  # not 20, not a loop
    assert shown == ["FAIL"] * 3  # the display shows what was stored
    assert all(t.user_attrs["ended"] == "failed: no usable value (val_loss is nan)"
               for t in trials)


BROKEN = """
from torch import nn


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        raise RuntimeError("forward is broken")


def build(input_shape, num_classes):
    return Broken()  # builds (validate passes), then fails every trial
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_exits_non_zero_when_it_stops_for_failures(tmp_path, workers):
    (tmp_path / "broken.py").write_text(BROKEN)
    data = study_data("fails", trials=10, epochs=1, size=128, run={"max_failures_in_row": 2},
                      model={"type": "broken:build"})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    out = subprocess.run([HPSEARCH, "run", "s.yaml", "--workers", workers, "--gpus", "none"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "trials failed in a row" in out.stdout + out.stderr
    assert out.stdout.count("FAIL") >= 2 and "COMPLETE" not in out.stdout


@pytest.mark.parametrize("changes, message", [
    ({"data": {"dataset": "synthetic", "val_fraction": 0.0}},
     "data.val_fraction: the objective val_loss needs a validation split"),
    ({"objective": {"metric": "val_accuracy"},
      "data": {"dataset": "synthetic"}, "fixed": {"data.val_fraction": 0}},
     "fixed.data.val_fraction: the objective val_accuracy needs a validation split"),
])
def test_a_validation_objective_without_a_validation_split_is_refused(tmp_path, changes,
                                                                      message):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study_data("v", **changes)))
    out = subprocess.run([HPSEARCH, "validate", "s.yaml"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 2 and message in out.stderr
    ok = study_data("v", objective={"metric": "train_loss"},
                    data={"dataset": "synthetic", "val_fraction": 0.0})
    assert parse_spec(ok).objective.metric == "train_loss"  # a train metric needs none


def test_a_study_file_that_is_not_utf8_is_exit_2_naming_the_file(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))
    out = subprocess.run([HPSEARCH, "validate", "latin1.yaml"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("error: latin1.yaml: not a UTF-8 text file (byte 9")
    assert "UnicodeDecodeError" not in out.stderr
