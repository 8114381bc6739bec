"""The LR range test for studies: the plan, the narrowed range, `auto` lr and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search._errors import SpecError
from search.run import create_or_load
from search.run._lr_find import narrowed_range, resolve
from search.run._lr_find import plan_tests as plan
from search.spec import (
    AutoEntry,
    RangeEntry,
    distributions,
    parse_spec,
    spec_from_json,
    train_config_for,
)
from search.storage import LR_FIND_ATTR, SPEC_ATTR, open_storage, quiet_optuna_warnings
from search.workers import run_worker
from tests.search_tests import studies
from tests.search_tests.studies import AUTO_LR
from trainers import LRFindResult

quiet_optuna_warnings()
ROOT = Path(__file__).resolve().parents[2]
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

def study_data(name: str = "lrf", **changes) -> dict:
    return studies.study_data(name, **{"trials": 2, "epochs": 1, "space": AUTO_LR, **changes})


def fake(optimizer: str, batch: int, low: float, high: float) -> LRFindResult:
    return LRFindResult(lrs=(), losses=(), smoothed=(), centered=(), suggested_max=high,
                        suggested_min=low, steepest_lr=low, min_loss_lr=high, rule="minimum",
                        rule_text="minimum: …", stopped="", optimizer=optimizer,
                        batch_size=batch, seconds=0.0)

def test_plan_tests_each_optimizer_and_few_batch_sizes():
    spec = parse_spec(study_data())
    assert plan(spec)[:2] == (["sgd", "adam"], [32, 64])
    wide = study_data(space={"lr": {"auto": True}, "batch_size": {"pow2": [16, 1024]}},
                      fixed={"optimizer": "nesterov"})
    optimizers, sizes, note = plan(parse_spec(wide))
    assert optimizers == ["nesterov"] and sizes == [16, 128, 1024]
    assert "smallest, middle and largest of the 7" in note
    fixed = plan(parse_spec(study_data(space={"lr": {"auto": True}},
                                       fixed={"batch_size": 256})), optimizer="adamw")
    assert fixed[:2] == (["adamw"], [256])
    with pytest.raises(SpecError, match="--optimizer: expected one of .*got 'adamx'"):
        plan(parse_spec(study_data()), optimizer="adamx")

def test_narrowed_range_is_the_widened_union_in_space_units():
    spec = parse_spec(study_data())
    results = [fake("sgd", 32, 0.01, 0.1), fake("adam", 64, 1e-4, 1e-3)]
    assert narrowed_range(spec, "lr", results) == (5e-5, 0.2)
    per = parse_spec(study_data(space={"lr": {"auto": True, "per_batch": 256},
                                       "batch_size": {"pow2": [32, 64]}}))
    # lr per 256 examples: an optimizer lr of 0.1 at batch 32 is 0.8 per 256.
    assert narrowed_range(per, "lr", [fake("sgd", 32, 0.01, 0.1)]) == (0.04, 1.6)

def test_run_lr_find_narrows_the_files_range_never_widens_it():
    ranged = study_data(space={"lr": {"low": 1e-3, "high": 0.1, "log": True}})
    spec = parse_spec(ranged)
    assert narrowed_range(spec, "lr", [fake("sgd", 32, 0.01, 0.5)]) == (0.005, 0.1)
    with pytest.raises(SpecError, match=r"space.lr: .*suggests \[2, 20\], outside the file's"):
        narrowed_range(spec, "lr", [fake("sgd", 32, 4.0, 10.0)])

def test_enqueued_lr_stays_inside_the_auto_range():
    spec = parse_spec(study_data(enqueue=[{"optimizer": "sgd", "lr": 3.0}]))
    assert narrowed_range(spec, "lr", [fake("sgd", 32, 0.01, 0.1)]) == (0.005, 3.0)

def test_auto_lr_has_no_distribution_until_resolved():
    spec = parse_spec(study_data())
    assert isinstance(spec.space["lr"], AutoEntry)
    with pytest.raises(SpecError, match="no range until the LR range test runs"):
        distributions(spec)
    resolved, record = resolve(spec, [fake("sgd", 32, 0.01, 0.1)], note="n", settings={})
    entry = resolved.space["lr"]
    assert isinstance(entry, RangeEntry) and entry.log and (entry.low, entry.high) == (0.005, 0.2)
    assert record["requested"]["auto"] is True and record["range"] == [0.005, 0.2]
    assert distributions(resolved)["lr"].high == 0.2

def test_per_batch_sets_linear_scaling_in_every_trial_config():
    spec = parse_spec(study_data(space={"lr": {"low": 0.01, "high": 1.0, "log": True,
                                               "per_batch": 256}}))
    config = train_config_for(spec, {"lr": 0.4})
    assert config.optimizer.lr_per_batch == 256 and config.optimizer.lr == 0.4
    with pytest.raises(SpecError, match="space.lr.per_batch: also set by "
                                        "fixed.optimizer.lr_per_batch"):
        parse_spec(study_data(space={"lr": {"low": 0.01, "high": 1.0, "per_batch": 256}},
                              fixed={"optimizer.lr_per_batch": 128}))
    with pytest.raises(SpecError, match="space.dropout.per_batch: only lr scales"):
        parse_spec(study_data(space={"dropout": {"low": 0.0, "high": 0.5, "per_batch": 256}}))

def test_auto_study_stores_the_resolved_range_and_workers_use_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(json.dumps(study_data()))
    url = f"sqlite:///{tmp_path / 's.db'}"
    run = subprocess.run([HPSEARCH, "run", "s.yaml", "--storage", url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "rule minimum" in run.stdout and "space.lr for study 'lrf'" in run.stdout
    assert len(list((tmp_path / "lr-find-lrf").glob("*.png"))) == 4
    study = optuna.load_study(study_name="lrf", storage=url)
    record = study.user_attrs[LR_FIND_ATTR]
    stored = spec_from_json(study.user_attrs[SPEC_ATTR])
    assert [stored.space["lr"].low, stored.space["lr"].high] == record["range"]
    assert {(t["optimizer"], t["batch_size"]) for t in record["tests"]} == {
        ("sgd", 32), ("sgd", 64), ("adam", 32), ("adam", 64)}
    low, high = record["range"]
    assert all(low <= t.params["lr"] <= high for t in study.trials)
    # Resuming with the same file runs no second test and is not "a changed file".
    again = subprocess.run([HPSEARCH, "run", "s.yaml", "--storage", url, "--trials", "3"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "no LR range test" in again.stdout and "rule minimum" not in again.stdout
    assert len(optuna.load_study(study_name="lrf", storage=url).trials) == 3

def test_lr_find_reruns_on_a_changed_file_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(study_data())
    resolved, record = resolve(spec, [fake("sgd", 32, 0.01, 0.1)], note="n", settings={})
    study = create_or_load(resolved, open_storage(url), lr_find=record)
    assert create_or_load(spec, open_storage(url)).study_name == study.study_name
    changed = study_data(space={**study_data()["space"], "lr": {"low": 0.005, "high": 0.2,
                                                                "log": True}})
    with pytest.raises(SpecError, match="different settings"):
        create_or_load(parse_spec(changed), open_storage(url))
    stored = optuna.load_study(study_name="lrf", storage=url)
    trial_spec = spec_from_json(stored.user_attrs[SPEC_ATTR])
    run_worker(stored, trial_spec, device="cpu", artifacts=None)
    assert all(0.005 <= t.params["lr"] <= 0.2 for t in stored.trials)

def test_lr_find_command_prints_suggestions_and_saves_plots(tmp_path):
    out = subprocess.run([HPSEARCH, "lr-find", str(ROOT / "studies" / "smoke.yaml"),
                          "--optimizer", "adam", "--iterations", "100", "--out", "plots"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rule minimum: max lr at the minimum" in out.stdout
    assert "suggested min" in out.stdout and "adam" in out.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "adam-batch128.png", "adam-batch32.png", "adam-batch64.png", "lr_find.json"]
    bad = subprocess.run([HPSEARCH, "lr-find", str(ROOT / "studies" / "smoke.yaml"),
                          "--optimizer", "sgdd"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "--optimizer: expected one of" in bad.stderr
