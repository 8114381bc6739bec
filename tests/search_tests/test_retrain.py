"""`hpsearch retrain`: the final test, and the proof that nothing before it reads the test set."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

import trainers._data
from search._errors import SpecError
from search.run import create_or_load, final_test, retrain
from search.run._lr_find import resolve, run_tests
from search.spec import parse_spec
from search.storage import RETRAIN_ATTR, open_storage, quiet_optuna_warnings
from search.workers import run_worker
from tests.search_tests import studies
from tests.search_tests.studies import AUTO_LR
from trainers import config_from_dict

quiet_optuna_warnings()
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

def study_data(name: str, **changes) -> dict:
    settings = {"trials": 3, "sampler": "tpe", "pruner": "median", "space": AUTO_LR,
                "enqueue": [{"optimizer": "sgd", "lr": 0.1, "batch_size": 32}], **changes}
    return studies.study_data(name, **settings)


@pytest.fixture
def data_loads(monkeypatch):
    """Every dataset build in this process, as (include_test, merge_val); caches emptied first
    so that no earlier load hides one."""
    trainers._data.clear_cache()
    calls: list[tuple[bool, bool]] = []
    build = trainers._data._build

    def recording(raw, config, device, include_test, merge_val):
        calls.append((include_test, merge_val))
        return build(raw, config, device, include_test, merge_val)

    monkeypatch.setattr(trainers._data, "_build", recording)
    yield calls
    trainers._data.clear_cache()

def test_the_search_never_reads_the_test_set_and_retrain_reads_it_once_per_seed(
        data_loads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(study_data("honest"))
    results, note = run_tests(spec, iterations=50)  # the LR range test of `lr: {auto: true}`
    spec, record = resolve(spec, results, note=note, settings={})
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"), lr_find=record)
    run_worker(study, spec, device="cpu", artifacts=None)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= 1
    assert data_loads and all(not include_test for include_test, _ in data_loads)
    assert all(not merge_val for _, merge_val in data_loads)

    searched = len(data_loads)
    trainers_seen: list[int] = []
    summary = retrain(study, spec, out=tmp_path / "final", seeds=2,
                      on_seed=lambda seed, result: trainers_seen.append(seed))
    # Retraining loads train+val with the test split, cached for the second seed.
    assert data_loads[searched:] == [(True, True)]
    assert trainers_seen == [0, 1]
    acc = summary["test_accuracy"]
    assert len(acc["per_seed"]) == 2 and acc["mean"] == pytest.approx(sum(acc["per_seed"]) / 2)
    assert acc["std"] >= 0 and 0 < acc["mean"] <= 1
    assert summary["seeds"] == 2 and summary["epochs"] == 2
    assert summary["trial"] == study.best_trial.number and summary["out"] == str(tmp_path /
                                                                                  "final")
    stored = optuna.load_study(study_name="honest", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert stored.user_attrs[RETRAIN_ATTR]["test_accuracy"] == acc
    files = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert files == ["config.yaml", "model-seed0.pt", "model-seed1.pt", "results.json"]
    weights = torch.load(tmp_path / "final" / "model-seed0.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    assert json.loads((tmp_path / "final" / "results.json").read_text())["study"] == "honest"

def test_final_test_is_seeded_and_summarised():
    config = config_from_dict({"dataset": "synthetic", "hidden": [16], "epochs": 2,
                               "batch_size": 64, "lr": 0.05, "seed": 3})
    one = final_test(config, seeds=1)
    assert one["test_accuracy"]["std"] == 0.0 and one["seed_values"] == [3]
    again = final_test(config, seeds=1)
    assert again["test_accuracy"] == one["test_accuracy"]  # seeded: the same model and test

def test_retrain_command(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(study_data("cli", space={"optimizer": {"choices": ["sgd", "adam"]},
                                               "lr": {"low": 0.01, "high": 0.3, "log": True}},
                                 enqueue=[]))
    study = create_or_load(spec, open_storage(url))
    run_worker(study, spec, device="cpu", artifacts=None)
    out = subprocess.run([HPSEARCH, "retrain", "cli", "--storage", url, "--epochs", "1",
                          "--out", "final"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and (tmp_path / "final" / "model-seed0.pt").exists()
    assert json.loads((tmp_path / "final" / "results.json").read_text())["epochs"] == 1
    missing = subprocess.run([HPSEARCH, "retrain", "nope", "--storage", url], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no study named 'nope'" in missing.stderr
    bad = subprocess.run([HPSEARCH, "retrain", "cli", "--storage", url, "--trial", "99"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--trial: expected a finished trial" in bad.stderr

def test_several_objectives_need_a_trial(tmp_path):
    data = study_data("multi", objective={"metrics": ["val_loss", "epoch_seconds"]},
                      pruner={"type": "none"}, budget={"trials": 2, "epochs": 1},
                      space={"lr": {"low": 0.01, "high": 0.3, "log": True}}, enqueue=[])
    spec = parse_spec(data)
    study = create_or_load(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    run_worker(study, spec, device="cpu", artifacts=None)
    with pytest.raises(SpecError, match="several objectives: choose one of its best trials"):
        retrain(study, spec, out=tmp_path / "x")
    number = study.best_trials[0].number
    assert retrain(study, spec, out=tmp_path / "x", trial=number)["trial"] == number


def test_selection_noise_retrains_the_best_trials_by_val_loss_with_several_seeds(tmp_path,
                                                                                  capsys):
    """benchmarks/selection_noise.py: the K best completed trials by val loss, S seeds each,
    and spreads that follow from the accuracies it prints."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_noise.py"
    load = importlib.util.spec_from_file_location("selection_noise", path)
    assert load is not None and load.loader is not None
    script = importlib.util.module_from_spec(load)
    load.loader.exec_module(script)

    spec = parse_spec(studies.study_data("noise", trials=4, epochs=1, sampler="random"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_or_load(spec, open_storage(url))
    run_worker(study, spec, device="cpu", artifacts=None)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    best_three = [t.number for t in sorted(complete, key=lambda t: (t.value, t.number))[:3]]

    assert script.main(["--storage", url, "--study", "noise", "--top", "3", "--seeds", "2",
                        "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [dict(kv.split("=") for kv in line.split()[1:]) for line in lines
            if line.startswith("trial ")]
    assert [int(r["number"]) for r in rows] == best_three
    accs = [[float(a) for a in r["test_acc"].split(",")] for r in rows]
    assert all(len(a) == 2 and all(0 <= x <= 1 for x in a) for a in accs)
    figures = dict(line.split(": ") for line in lines[1:] if ": " in line)
    means = [sum(a) / 2 for a in accs]
    assert float(figures["selection_sd"]) == pytest.approx(statistics.stdev(means), abs=1e-4)
    vals = [t.value for t in sorted(complete, key=lambda t: (t.value, t.number))[:3]]
    ranked = [sorted(vals).index(v) for v in vals], [sorted(means).index(m) for m in means]
    if len(set(means)) == 3:  # Spearman's of 3 distinct pairs: 1 - 6·Σd² / (3·8)
        d2 = sum((a - b) ** 2 for a, b in zip(*ranked, strict=True))
        assert float(figures["rank_correlation"]) == pytest.approx(1 - d2 / 4, abs=0.01)
    assert float(figures["best_by_val_test_acc"]) == pytest.approx(accs[0][0], abs=1e-4)
    assert sorted((tmp_path / "out").iterdir()) == [tmp_path / "out" / f"trial-{n}"
                                                    for n in sorted(best_three)]

    for storage, study_name, said in ((url, "nope", "no study named 'nope'"),
                                      (f"sqlite:///{tmp_path / 'none.db'}", "noise",
                                       "no database at")):
        with pytest.raises(SystemExit) as refused:
            script.main(["--storage", storage, "--study", study_name])
        assert refused.value.code == 2
        assert said in capsys.readouterr().err
