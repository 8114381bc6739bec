"""Fine-tuning as a study: weights, freeze depth and head lr searched like any other knob."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState

from search.run import create_or_load
from search.spec import load_spec, parse_spec
from search.storage import open_storage, quiet_optuna_warnings
from search.workers import run_worker
from trainers import train

ROOT = Path(__file__).resolve().parents[2]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
NET = {"type": "cnn", "widths": [8, 16]}

quiet_optuna_warnings()

@pytest.fixture
def weights(tmp_path) -> Path:
    pre = train({"data": {"dataset": "synthetic", "size": 512, "classes": [0, 1, 2, 3, 4]},
                 "model": NET, "epochs": 1, "device": "cpu"})
    path = tmp_path / "pre.pt"
    torch.save(pre.model.state_dict(), path)
    return path

def finetune_study(name: str, weights: Path) -> dict:
    return {
        "name": name,
        "budget": {"trials": 4, "epochs": 2},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "data": {"dataset": "synthetic", "size": 512, "classes": [5, 6, 7, 8, 9],
                 "train_subset": 200},
        "model": {**NET, "weights": str(weights), "reset_head": True},
        "space": {
            "lr": {"low": 1e-3, "high": 0.3, "log": True},
            "freeze_blocks": {"low": 0, "high": 2},
            "head_lr_mult": {"low": 1, "high": 100, "log": True},
            "unfreeze_after": {"choices": [None, 1]},
            "bn_stats": {"choices": ["update", "frozen_layers"]},
        },
    }

def test_fine_tune_study_records_groups_and_trained_parameters(sqlite_url, study_name, weights,
                                                              tmp_path):
    spec = parse_spec({**finetune_study(study_name, weights),
                       "run": {"checkpoint_dir": str(tmp_path / "ckpt")}})
    study = create_or_load(spec, open_storage(sqlite_url))
    run_worker(study, spec, device="cpu")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    convs = 8 * 9 + 2 * 8 + 16 * 8 * 9 + 2 * 16  # two conv-BN blocks
    total = convs + 16 * 5 + 5  # and a five-class head
    sizes = {0: total, 1: total - 8 * 9 - 2 * 8, 2: total - 8 * 9 - 2 * 8 - 16 * 8 * 9 - 2 * 16}
    for t in trials:
        first = t.user_attrs["history"][0]
        assert first["trained_parameters"] == sizes[t.params["freeze_blocks"]]
        lrs = first["group_lrs"]
        assert lrs["head"] == pytest.approx(t.params["lr"] * t.params["head_lr_mult"], rel=1e-5)
        if t.params["freeze_blocks"] < 2:
            assert lrs["body"] == pytest.approx(t.params["lr"], rel=1e-5)
        if t.params["unfreeze_after"] == 1 and t.params["freeze_blocks"]:
            assert t.user_attrs["history"][1]["trained_parameters"] == total
        assert t.user_attrs["weights_notes"][-1].startswith("re-initialized head 9")
        assert t.user_attrs["parameters"] == total

def test_a_missing_weights_file_stops_before_the_storage(tmp_path):
    study = finetune_study("ft", tmp_path / "absent.pt")
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(study))
    run = subprocess.run([HPSEARCH, "run", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert "model.weights" in run.stderr and "absent.pt: no such file" in run.stderr
    assert "python -m trainers CONFIG.yaml --save" in run.stderr
    assert not (tmp_path / "x.db").exists()

@pytest.mark.parametrize("change, message", [
    ({"model": {**NET, "widths": [8, 32]}},
     "model.weights: {weights} does not fit this Sequential; shapes differ (5): 4.weight "
     "(file [16, 8, 3, 3], model [32, 8, 3, 3])"),
    ({"model": {**NET, "freeze": "7"}}, "model.freeze: '7' names no parameter of cnn"),
    ({"space": {"lr": {"low": 1e-3, "high": 0.3, "log": True},
                "freeze_blocks": {"low": 0, "high": 3}}},
     "model.freeze_blocks: cnn has 2 blocks before its head, got 3"),
    ({"model": {**NET, "freeze": "0,1,4,5,9"}}, "model.freeze: every parameter is frozen"),
    ({"model": {**NET, "stem": "tiny"}}, "unknown model.stem 'tiny'"),
    ({"model": {**NET, "bn_stats": "frozn"}}, "Did you mean 'frozen'?"),
])
def test_bad_fine_tuning_settings_stop_before_the_storage(tmp_path, weights, change, message):
    study = {**finetune_study("ft", weights), **change}
    study["model"] = {**study["model"], "weights": str(weights)}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(study))
    for args in (["validate"], ["run", "--storage", f"sqlite:///{tmp_path}/x.db"]):
        out = subprocess.run([HPSEARCH, args[0], str(path), *args[1:]],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert message.format(weights=weights) in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x.db").exists()

def test_cli_run_of_a_fine_tune_study_says_where_it_starts(tmp_path, weights):
    study = finetune_study("ft", weights)
    study["budget"] = {"trials": 1, "epochs": 1}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(study))
    run = subprocess.run([HPSEARCH, "run", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"fine-tuning from {weights}" in run.stdout

def test_shipped_finetune_study_and_its_pretraining_config_are_valid(tmp_path, monkeypatch):
    """The study file names weights made by its pretraining config: both must stay valid."""
    from trainers import config_from_dict

    pre = yaml.safe_load((ROOT / "studies/pretrain/fashion_cnn_0to4.yaml").read_text())
    pre_config = config_from_dict(pre)
    study = yaml.safe_load((ROOT / "studies/fashion_finetune.yaml").read_text())
    assert study["model"]["widths"] == list(pre_config.model.widths)
    weights = tmp_path / study["model"]["weights"]
    weights.parent.mkdir(parents=True)
    net = train({**pre, "data": {"dataset": "synthetic", "size": 64, "classes": [0, 1, 2, 3, 4]},
                 "epochs": 1, "device": "cpu"}).model
    torch.save(net.state_dict(), weights)
    monkeypatch.chdir(tmp_path)  # the file's relative weights path
    spec = load_spec(ROOT / "studies/fashion_finetune.yaml")
    assert spec.name == "fashion-finetune"
    assert {"freeze_blocks", "head_lr_mult", "lr", "scheduler"} <= set(spec.space)
