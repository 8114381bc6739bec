"""`run --warm-start`: the best fitting trials of another study, enqueued once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search._errors import SpecError, StudyNotFoundError
from search.run import create_or_load, load_source, parse_source, warm_start
from search.spec import distributions, enqueue_params, parse_spec
from search.storage import WARM_START_ATTR, open_storage, quiet_optuna_warnings

quiet_optuna_warnings()
HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

def study_data(name: str, space: dict, **changes) -> dict:
    return {"name": name, "budget": {"trials": 4, "epochs": 1},
            "data": {"dataset": "synthetic", "size": 256}, "model": {"type": "mlp"},
            "space": space, **changes}

SOURCE_SPACE = {
    "optimizer": {"choices": ["sgd", "adam"]},
    "lr": {"low": 1e-4, "high": 1.0, "log": True},
    "batch_size": {"pow2": [32, 256]},
}
# (optimizer, lr, batch size, val_loss), best first by val_loss: 0.30, 0.31, …
SOURCE_TRIALS = [("sgd", 0.1, 64, 0.31), ("adam", 3e-3, 128, 0.30), ("sgd", 0.5, 256, 0.40),
                 ("adam", 1e-4, 32, 0.50), ("sgd", 0.05, 32, 0.35)]

@pytest.fixture
def source(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec(study_data("source", SOURCE_SPACE))
    study = create_or_load(spec, open_storage(url))
    for optimizer, lr, batch, value in SOURCE_TRIALS:
        flat = {"optimizer": optimizer, "lr": lr, "batch_size": batch}
        study.add_trial(create_trial(params=enqueue_params(spec, flat),
                                     distributions=distributions(spec), value=value))
    study.add_trial(create_trial(state=TrialState.PRUNED, params=enqueue_params(
        spec, {"optimizer": "sgd", "lr": 0.2, "batch_size": 32}),
        distributions=distributions(spec), intermediate_values={0: 0.1}))
    return url, study

def target(url: str, space: dict, name: str = "target", **changes):
    spec = parse_spec(study_data(name, space, **changes))
    return create_or_load(spec, open_storage(url)), spec

def queued(study: optuna.Study) -> list[dict]:
    return [t.system_attrs["fixed_params"] for t in study.get_trials(states=(TrialState.WAITING,))]

def test_parse_source():
    assert parse_source("fashion-mlp") == ("fashion-mlp", 5)
    assert parse_source("fashion-mlp:3") == ("fashion-mlp", 3)
    for bad in ("x:0", "x:k", ":3"):
        with pytest.raises(SpecError, match="--warm-start: expected STUDY or STUDY:k"):
            parse_source(bad)

def test_top_k_fitting_trials_are_enqueued_best_first_once(source):
    url, other = source
    # Only SGD at batch sizes 32..128 fits here: adam is not a choice, batch 256 out of range.
    study, spec = target(url, {"optimizer": {"choices": ["sgd", "nesterov"]},
                               "lr": {"low": 1e-3, "high": 1.0, "log": True},
                               "batch_size": {"pow2": [32, 128]}})
    done = warm_start(study, spec, other, k=2)
    assert done.used == [0, 4]  # val_loss 0.31 then 0.35; trial 1 (adam, 0.30) skipped
    assert done.skipped == 1 and "#1" in done.reasons[0]
    assert queued(study) == [{"optimizer": "sgd", "lr": 0.1, "log2_batch_size": 6},
                             {"optimizer": "sgd", "lr": 0.05, "log2_batch_size": 5}]
    assert "enqueued 2 of the best trials of 'source' (#0, #4); skipped 1" in done.describe()
    record = study.user_attrs[WARM_START_ATTR]
    assert record == [{"study": "source", "storage": None, "k": 2, "trials": [0, 4],
                       "skipped": 1}]
    again = warm_start(study, spec, other, k=2)
    assert again.already and len(queued(study)) == 2

def test_constants_and_linear_scaling_are_translated(source):
    url, other = source
    # This study holds the optimizer at sgd (adam trials do not fit) and samples lr per 256.
    study, spec = target(url, {"lr": {"low": 1e-3, "high": 10.0, "log": True, "per_batch": 256},
                               "batch_size": {"pow2": [32, 256]}},
                         fixed={"optimizer": "sgd"})
    done = warm_start(study, spec, other, k=5)
    assert done.used == [0, 4, 2] and done.skipped == 2
    lrs = [p["lr"] for p in queued(study)]
    # Optimizer lr 0.1 at batch 64 is 0.4 per 256 examples; 0.05 at 32 is 0.4; 0.5 at 256 is 0.5.
    assert lrs == pytest.approx([0.4, 0.4, 0.5])

def test_unknown_or_self_source_is_refused_before_anything_runs(source, tmp_path):
    url, _ = source
    storage = open_storage(url)
    with pytest.raises(StudyNotFoundError, match="no study named 'nope'.*studies: source"):
        load_source("nope", storage, target="t")
    with pytest.raises(SpecError, match="cannot warm-start itself"):
        load_source("source", storage, target="source")

def test_run_warm_start_from_another_storage(source, tmp_path):
    url, _ = source
    data = study_data("fresh", {"optimizer": {"choices": ["sgd", "adam"]},
                                "lr": {"low": 1e-4, "high": 1.0, "log": True}},
                      fixed={"batch_size": 64}, budget={"trials": 1, "epochs": 1},
                      sampler={"type": "random", "seed": 0})
    (tmp_path / "f.yaml").write_text(str(data).replace("'", '"').replace("True", "true"))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    out = subprocess.run([HPSEARCH, "run", "f.yaml", "--storage", other, "--warm-start",
                          "source:1", "--warm-start-storage", url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warm start: enqueued 1 of the best trials of 'source' (#0)" in out.stdout
    assert "skipped 1" in out.stdout  # #1 trained at batch 128; this study holds 64
    study = optuna.load_study(study_name="fresh", storage=other)
    assert study.trials[0].params == {"optimizer": "sgd", "lr": 0.1}
    assert study.trials[0].user_attrs["warm_start"] == "source#0"
    missing = subprocess.run([HPSEARCH, "run", "f.yaml", "--storage", f"sqlite:///{tmp_path}/n.db",
                              "--warm-start", "nope"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no study named 'nope'" in missing.stderr
    assert "fresh" not in optuna.get_all_study_names(f"sqlite:///{tmp_path}/n.db")
