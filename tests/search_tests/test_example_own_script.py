"""examples/own_script end to end: a user's standalone training script, run once per trial
(`trainer: {command: [python, train.py, ...]}`), on real FashionMNIST.

The study runs through `hpsearch run` with two workers, as its README says, with a smaller
budget and the environment's interpreter first on PATH (as an activated virtualenv has it).
Every finished trial keeps its charts, metrics and the script's output; status and report read
the study, and retrain runs the script with HPSEARCH_FINAL=1, which reports the test metrics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from search.storage import artifact_location, open_artifact_store
from tests.search_tests.studies import views_and_retrain

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_script"
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
NAME = "own-script"
TRIALS, EPOCHS = 4, 2
# The command says `python`: found on PATH, so this environment's (with torch and hpsearch).
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


@pytest.fixture
def project(tmp_path) -> Path:
    """The example copied as a user would have it, with its study's budget made small."""
    folder = tmp_path / "own_script"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(
        "checkpoints", "retrain-*", "*.db*", "__pycache__"))
    study = yaml.safe_load((folder / "study.yaml").read_text())
    study["budget"] = {"trials": TRIALS, "epochs": EPOCHS}
    study["fixed"]["subset"] = 3000
    study["space"]["hidden"] = {"choices": [64, 128]}
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder


def test_the_script_runs_per_trial_and_every_view_reads_the_study(project):
    out = run(HPSEARCH, "run", "study.yaml", "--workers", "2", "--gpus", "none", cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"sqlite:///{project / 'hpsearch.db'}"
    study = optuna.load_study(study_name=NAME, storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS == len(study.trials), out.stdout
    assert len({t.user_attrs["pid"] for t in finished}) == 2
    store = open_artifact_store(artifact_location(url))  # where the workers put them
    for t in finished:
        meta = {m.filename: m for m in get_all_artifact_meta(t, storage=study._storage)}
        assert {"curves.svg", "metrics.json", "output.txt"} <= set(meta), t.number
        # What the script printed, its report lines among it, is kept with the trial.
        with store.open_reader(meta["output.txt"].artifact_id) as f:
            assert '@hpsearch {"epoch": 1, "train_loss"' in f.read().decode()
        history = t.user_attrs["history"]
        assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
        assert all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in history)
        if t.state == TrialState.COMPLETE:
            assert len(history) == EPOCHS and t.value == history[-1]["val_accuracy"]

    counts, results = views_and_retrain(HPSEARCH, NAME, project)
    assert counts["finished"] == TRIALS
    assert results["trial"] == study.best_trial.number
    assert results["epochs"] == EPOCHS
    # The script's last report under HPSEARCH_FINAL=1: the 10,000 test images, read once; ten
    # classes, so chance is 0.1.
    assert results["test_accuracy"]["mean"] > 0.5 and results["test_loss"]["mean"] > 0
    assert "val_accuracy" not in results  # no validation set: it was trained on
