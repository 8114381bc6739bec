"""examples/own_model end to end: a user's conv net on a folder of real FashionMNIST PNGs.

The example's own script writes the images; the study runs through `hpsearch run` with two
workers, as its README says, with a smaller budget; every trial leaves its charts, and status,
report and retrain read it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_model"
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The example copied as a user would have it, with 2,000 + 500 images written by its
    script, and its study's budget made small."""
    folder = tmp_path_factory.mktemp("example") / "own_model"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("images", "*.db*"))
    made = run(sys.executable, "make_images.py", "--train", "2000", "--test", "500", cwd=folder)
    assert made.returncode == 0, made.stderr
    assert len(list((folder / "images" / "train").glob("*/*.png"))) == 2000
    study = yaml.safe_load((folder / "study.yaml").read_text())
    study["budget"] = {"trials": 4, "epochs": 2}
    study["space"]["model.width"] = {"choices": [8, 16]}
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder


def test_the_example_runs_with_two_workers_and_every_view_reads_it(project):
    url = f"sqlite:///{project / 'hpsearch.db'}"
    out = run(HPSEARCH, "run", "study.yaml", "--workers", "2", "--gpus", "none", cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr
    study = optuna.load_study(study_name="own-model", storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len({t.user_attrs["pid"] for t in finished}) == 2
    assert {t.params["model.width"] for t in finished} <= {8, 16}
    for t in finished:
        names = {m.filename for m in get_all_artifact_meta(t, storage=study._storage)}
        assert {"curves.svg", "lr.svg", "grad_norms.svg", "metrics.json"} <= names
        # The gradient-norm chart sees the network's own layers: two convs and the classifier.
        assert set(t.user_attrs["history"][0]["grad_norms"]) == {"conv2d1", "conv2d2", "linear1"}

    status = json.loads(run(HPSEARCH, "status", "own-model", "--json", cwd=project).stdout)
    assert status["counts"]["finished"] == 4
    report = run(HPSEARCH, "report", "own-model", "--out", "report.html", cwd=project)
    assert report.returncode == 0 and (project / "report.html").stat().st_size > 100_000

    retrain = run(HPSEARCH, "retrain", "own-model", cwd=project)
    assert retrain.returncode == 0, retrain.stderr
    results = json.loads((project / "retrain-own-model" / "results.json").read_text())
    # 500 real test images, read once; ten classes, so chance is 0.1.
    assert results["test_accuracy"]["mean"] > 0.3
