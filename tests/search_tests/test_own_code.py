"""A study of a user's own network and dataset, by import path, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.plugins import install_package

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

NETS = '''
import math
from torch import nn


def build(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def not_a_module(input_shape, num_classes):
    return "a string"
'''

DATA = '''
import torch


def blobs(n=600, d=12):
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, d, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 3, (n + 200,), generator=g)
    x = centers[y] + torch.randn(n + 200, d, generator=g)
    return {"train_x": x[:n], "train_y": y[:n], "test_x": x[n:], "test_y": y[n:]}


def unlabelled(n=100):
    return {"train_x": torch.randn(n, 4)}
'''


def hp(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def project(tmp_path: Path, **changes) -> Path:
    """A user's folder: their two modules and a study file naming them."""
    (tmp_path / "mynets.py").write_text(NETS)
    (tmp_path / "mydata.py").write_text(DATA)
    study = {
        "name": "own", "budget": {"trials": 6, "epochs": 2},
        "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
        "data": {"dataset": "mydata:blobs", "n": 600},
        "model": {"type": "mynets:build"},
        "space": {"lr": {"low": 1e-3, "high": 0.3, "log": True},
                  "model.width": {"choices": [8, 32]}},
        **changes,
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_a_users_network_and_data_run_as_a_study_with_two_workers(tmp_path):
    path = project(tmp_path)
    url = f"sqlite:///{tmp_path / 'own.db'}"
    assert hp("validate", str(path), cwd=tmp_path).returncode == 0
    run = hp("run", str(path), "--storage", url, "--workers", "2", "--gpus", "none",
             cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    study = optuna.load_study(study_name="own", storage=url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6 and len({t.user_attrs["pid"] for t in done}) == 2
    assert {t.params["model.width"] for t in done} <= {8, 32}
    assert all(len(t.user_attrs["history"]) == 2 for t in done)
    status = json.loads(hp("status", "own", "--storage", url, "--json", cwd=tmp_path).stdout)
    assert status["counts"]["complete"] == 6
    best = yaml.safe_load(hp("best", "own", "--storage", url, cwd=tmp_path).stdout)
    assert best["config"]["model"]["type"] == "mynets:build"
    assert best["config"]["model"]["width"] == best["params"]["model.width"]
    assert best["config"]["data"]["n"] == 600
    retrain = hp("retrain", "own", "--storage", url, cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr
    assert "test accuracy" in retrain.stdout
    results = json.loads((tmp_path / "retrain-own" / "results.json").read_text())
    assert results["test_accuracy"]["mean"] > 0.8


@pytest.mark.parametrize("changes,message", [
    ({"model": {"type": "mynetz:build"}},
     "model.type: mynetz:build: cannot import 'mynetz' (ModuleNotFoundError"),
    ({"model": {"type": "mynets:biuld"}}, "module 'mynets' has no attribute 'biuld'"),
    ({"model": {"type": "mynets:not_a_module"}},
     "mynets:not_a_module returned str, expected a torch.nn.Module"),
    ({"data": {"dataset": "mydata:unlabelled"}},
     "mydata:unlabelled returned a mapping without train_y"),
    ({"data": {"dataset": "mydata:blobs", "rows": 5}},
     "mydata:blobs does not take the arguments rows"),
])
def test_bad_user_code_stops_validate_and_run_with_one_line_and_exit_2(tmp_path, changes,
                                                                      message):
    path = project(tmp_path, **changes)
    # `run` reads the file as `validate` does (load_spec): once for the first case is enough.
    commands = [["validate", str(path)]] + [["run", str(path)]] * ("mynetz" in str(changes))
    for command in commands:
        out = hp(*command, cwd=tmp_path)
        assert out.returncode == 2, out.stdout + out.stderr
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hpsearch.db").exists()  # nothing touched the storage


def test_a_head_that_names_no_module_is_refused_by_validate(tmp_path):
    """`model.head` is checked by building the network, for a built-in one too."""
    path = project(tmp_path, model={"type": "mlp", "hidden": [8], "head": "classifier"},
                   data={"dataset": "synthetic", "size": 256},
                   space={"lr": {"low": 0.01, "high": 0.1, "log": True}})
    out = hp("validate", str(path), cwd=tmp_path)
    assert out.returncode == 2
    assert "model.head: 'classifier' names no module with parameters; expected one of: 1, 3" \
        in out.stderr


def test_a_worker_that_cannot_import_the_users_code_takes_no_trial(tmp_path):
    path = project(tmp_path)
    url = f"sqlite:///{tmp_path / 'own.db'}"
    assert hp("run", str(path), "--storage", url, "--create-only", cwd=tmp_path).returncode == 0
    elsewhere = tmp_path / "other-machine"
    elsewhere.mkdir()
    out = hp("worker", "own", "--storage", url, "--gpus", "none", cwd=elsewhere)
    assert out.returncode == 2
    assert "data.dataset: mydata:blobs: cannot import 'mydata'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert optuna.load_study(study_name="own", storage=url).trials == []


def test_list_shows_built_in_and_installed_models_and_datasets(tmp_path):
    (tmp_path / "acme.py").write_text(NETS + DATA)
    install_package(tmp_path, "acme", models={"acmenet": "acme:build"},
                    datasets={"acme_blobs": "acme:blobs"})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([HPSEARCH, "list", "models", "datasets"], capture_output=True,
                         text=True, env=env, check=True)
    assert "built in: mlp, cnn, resnet18" in out.stdout
    assert "installed (hpsearch.models): acmenet (acme:build)" in out.stdout
    assert "installed (hpsearch.datasets): acme_blobs (acme:blobs)" in out.stdout
    # The installed names work in a study file, and a typo names them.
    path = project(tmp_path, model={"type": "acmenett"})
    bad = subprocess.run([HPSEARCH, "validate", str(path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "Did you mean 'acmenet'?" in bad.stderr
    good = project(tmp_path, model={"type": "acmenet", "width": 8},
                   data={"dataset": "acme_blobs"}, space={"lr": {"low": 0.01, "high": 0.1}})
    ok = subprocess.run([HPSEARCH, "validate", str(good)], capture_output=True, text=True,
                        env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_an_image_folder_study_streams_with_two_workers_and_retrains(tmp_path):
    """The built-in image_folder through the command line: no code of the user's at all."""
    import numpy as np
    from PIL import Image

    for split, n in (("train", 90), ("test", 30)):
        for c in range(3):
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            rng = np.random.default_rng(c)
            for i in range(n // 3):
                pixels = 30 + 80 * c + rng.integers(0, 40, (10, 10))
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    study = {
        "name": "folder", "budget": {"trials": 4, "epochs": 3}, "fixed": {"batch_size": 16},
        "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
        "data": {"dataset": "image_folder", "root": "images/train", "test_root": "images/test",
                 "augment": ["flip"], "num_workers": 1},
        "model": {"type": "cnn", "widths": [8, 16]},
        "space": {"lr": {"low": 1e-2, "high": 0.2, "log": True}},
    }
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(study))
    url = f"sqlite:///{tmp_path / 'folder.db'}"
    run = hp("run", "folder.yaml", "--storage", url, "--workers", "2", "--gpus", "none",
             cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    trials = optuna.load_study(study_name="folder", storage=url).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and len({t.user_attrs["pid"] for t in done}) == 2
    assert max(t.user_attrs["history"][-1]["val_accuracy"] for t in done) > 0.8
    retrain = hp("retrain", "folder", "--storage", url, cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr
    results = json.loads((tmp_path / "retrain-folder" / "results.json").read_text())
    assert results["test_accuracy"]["mean"] > 0.8

    study["data"]["root"] = "images/nowhere"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(study))
    bad = hp("validate", "bad.yaml", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "data.root" in bad.stderr and "is not a directory" in bad.stderr
