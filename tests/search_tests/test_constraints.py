"""`constraints:` on reported and returned metrics: checked at validate, given to the samplers
as each trial's constraint values, and the best feasible trial in `best`, `status`, `report`
and `load_results`.

The study searches x in [0, 2] for loss (x - 1)^2 and reports size = x under `size <= 0.5`: the
unconstrained optimum x = 1 is infeasible, so only the constraints keep TPE away from it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import search
from search._errors import SearchError
from search.run._retrain import chosen_trial
from search.run._warm_start import _ranked
from search.spec import (
    BUILT_IN_METRICS,
    METRICS,
    best_trials,
    constraint_values,
    is_feasible,
    parse_spec,
)
from search.spec._constraints import MISSING, Constraint
from search.storage import constraint_attrs
from search.trial._history import HISTORY_FIELDS
from search.views import status_data
from search.views._status import show_best

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
CODE = '''
def fit(params, trial):
    """Best at x = 1, where size (returned, not reported) breaks `size <= 0.5`."""
    x = params["x"]
    trial.report(1, loss=(x - 1.0) ** 2)
    return {"loss": (x - 1.0) ** 2, "size": x}
'''
SIZE = [{"metric": "size", "max": 0.5}]


def study(name: str, **changes: Any) -> dict[str, Any]:
    return {"name": name, "trainer": "constrained_fit:fit", "objective": {"metric": "loss"},
            "budget": {"trials": 30, "epochs": 1}, "sampler": {"type": "tpe", "seed": 0},
            "pruner": {"type": "none"}, "space": {"x": {"low": 0.0, "high": 2.0}}, **changes}


def hp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


# ---------------------------------------------------------------------------- the study file
@pytest.mark.parametrize(("changes", "line"), [
    ({"sampler": {"type": "random", "seed": 0}},
     "constraints: sampler 'random' ignores constraints; the samplers that use them are tpe, "
     "nsga2, gp (or a sampler class whose __init__ takes constraints_func)"),
    ({"sampler": {"type": "optuna.samplers:QMCSampler"}},
     "constraints: sampler 'optuna.samplers:QMCSampler' ignores constraints; the samplers "
     "that use them are tpe, nsga2, gp (or a sampler class whose __init__ takes "
     "constraints_func)"),
    ({"constraints": [{"metric": "size"}]},
     "constraints[0]: expected max: or min: (or both) to bound size, got neither"),
    ({"constraints": [{"metric": "size", "max": 1}, {"metric": "size", "max": 1}]},
     "constraints[1]: size <= 1 is given twice"),
    ({"constraints": [{"metric": "size", "mx": 1}]},
     "constraints[0].mx: unknown key, did you mean 'max'? (expected one of: metric, max, min)"),
], ids=["random", "qmc-by-path", "no-bound", "twice", "typo"])
def test_validate_exits_2_naming_the_constraints_key(tmp_path, changes, line):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study("c", **{"constraints": SIZE, **changes}),
                                   sort_keys=False))
    done = hp("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"error: {path}: {line}"]


def test_the_built_in_trainer_bounds_only_its_own_metrics():
    base = {"name": "b", "data": {"dataset": "synthetic"}, "model": {},
            "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}}
    spec = parse_spec({**base, "constraints": [{"metric": "parameters", "max": 1e5},
                                              {"metric": "val_accuracy", "min": 0.5}]})
    assert [c.metric for c in spec.constraints] == ["parameters", "val_accuracy"]
    with pytest.raises(search.SpecError, match=r"constraints\[0\]\.metric: .*got 'params_m', "
                       r"did you mean 'parameters'\? \(or any metric your own trainer: reports"):
        parse_spec({**base, "constraints": [{"metric": "params_m", "max": 5}]})
    # Each metric the built-in trainer may bound is one it stores on the trial.
    assert set(METRICS) <= set(BUILT_IN_METRICS)
    assert set(BUILT_IN_METRICS) - set(HISTORY_FIELDS) == {"parameters"}


def test_samplers_that_take_constraints_are_accepted_by_path_and_name():
    for sampler in ("tpe", "nsga2", "gp", "optuna.samplers:NSGAIIISampler"):
        spec = parse_spec(study("s", sampler={"type": sampler}, constraints=SIZE))
        assert spec.constraints == [Constraint(metric="size", max=0.5)]


# ------------------------------------------------------------------------ constraint values
def test_constraint_values_are_optunas_convention_from_the_last_value():
    both = [Constraint(metric="acc", min=0.8), Constraint(metric="size", min=1, max=5)]
    history = [{"epoch": 1, "acc": 0.5, "size": 9.0}, {"epoch": 2, "acc": 0.9}]
    values = constraint_values(both, {"history": history})
    # Over a bound is positive, within it 0 or less; the last report of each metric counts.
    assert values == pytest.approx({"acc >= 0.8": -0.1, "size >= 1": -8.0, "size <= 5": 4.0})
    returned = constraint_values(both, {"history": history, "returned": {"size": 3.0}})
    assert returned["size <= 5"] == -2.0 and returned["size >= 1"] == -2.0  # returned wins
    # Never reported, or NaN (stored as null): infeasible, by a finite value Optuna accepts.
    missing = constraint_values(both, {"history": [{"epoch": 1, "acc": None}]})
    assert set(missing.values()) == {MISSING} and math.isfinite(MISSING)
    # The built-in trainer's parameter count is an attr of the trial, not a report.
    params = constraint_values([Constraint(metric="parameters", max=1000)],
                               {"history": [{"epoch": 1}], "parameters": 1200})
    assert params == {"parameters <= 1000": 200.0}


def _add(study: optuna.Study, values: list[float], constraints: dict[str, float]) -> None:
    study.add_trial(optuna.trial.create_trial(
        values=values, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
        system_attrs=constraint_attrs(constraints)))


def test_best_is_the_best_feasible_trial_and_optuna_reads_the_values():
    single = optuna.create_study()
    _add(single, [0.1], {"size <= 0.5": 0.4})
    _add(single, [0.3], {"size <= 0.5": 0.0})
    assert single.trials[0].constraints == {"size <= 0.5": 0.4}
    assert [is_feasible(t) for t in single.trials] == [False, True]
    assert [t.number for t in best_trials(single)] == [1]
    multi = optuna.create_study(directions=["minimize", "minimize"])
    _add(multi, [0.1, 0.1], {"c": 1.0})
    _add(multi, [0.2, 0.3], {"c": -1.0})
    _add(multi, [0.3, 0.2], {"c": -1.0})
    assert sorted(t.number for t in best_trials(multi)) == [1, 2]
    none = optuna.create_study()
    _add(none, [0.1], {"c": 2.0})
    assert best_trials(none) == []  # where Study.best_trial raises
    # --warm-start from it tries its feasible trials first.
    assert [t.number for t in _ranked(single)] == [1, 0]


# ------------------------------------------------------------------------- the study itself
@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "constrained_fit.py").write_text(CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _feasible_share(rows: list[dict[str, Any]]) -> float:
    later = [r for r in rows if r["trial"] >= 10]  # after TPE's 10 random startup trials
    return sum(r["x"] <= 0.5 for r in later) / len(later)


def test_constraints_steer_a_small_study_away_from_infeasible_configs(project):
    url = f"sqlite:///{project / 'c.db'}"
    free = search.tune(study("free"), storage=url, show_progress=False)
    bound = search.tune(study("bound", constraints=SIZE), storage=url, show_progress=False)
    # Same seed, same startup trials; the constraints alone change where TPE goes next.
    assert [r["x"] for r in free.trials[:10]] == [r["x"] for r in bound.trials[:10]]
    assert _feasible_share(free.trials) <= 0.3 and free.best_params["x"] > 0.9
    assert _feasible_share(bound.trials) >= 0.6
    assert bound.best_params["x"] <= 0.5 and bound.best_value >= 0.25
    assert bound.best_value == min(r["loss"] for r in bound.trials if r["x"] <= 0.5)
    assert [r["feasible"] for r in bound.trials] == [r["x"] <= 0.5 for r in bound.trials]
    assert "feasible" not in free.trials[0]
    stored = optuna.load_study(study_name="bound", storage=url)
    assert all(set(t.constraints) == {"size <= 0.5"} for t in stored.trials)

    status = hp("status", "bound", "--storage", url, cwd=project)
    feasible = sum(r["feasible"] for r in bound.trials)
    assert f"constraints size <= 0.5: {feasible} of 30 complete trials feasible" in status.stdout
    assert f"best: trial #{bound.best_trial}: loss" in status.stdout
    assert "feasible: size <= 0.5 (" in status.stdout
    data = json.loads(hp("status", "bound", "--storage", url, "--json", cwd=project).stdout)
    assert data["constraints"] == {"bounds": ["size <= 0.5"], "complete": 30,
                                   "feasible": feasible}
    assert data["best"][0]["constraints"]["size <= 0.5"] <= 0.5
    best = yaml.safe_load(hp("best", "bound", "--storage", url, cwd=project).stdout)
    assert best["trial"] == bound.best_trial and best["params"]["x"] <= 0.5
    report = hp("report", "bound", "--storage", url, "--out", "r.html", cwd=project)
    assert report.returncode == 0, report.stderr
    page = (project / "r.html").read_text()
    assert f"Constraints size &lt;= 0.5: {feasible} of 30 complete trials feasible." in page
    assert "<th>feasible</th><th>size &lt;= 0.5</th>" in page
    overview = hp("status", "--storage", url, cwd=project).stdout.splitlines()
    assert any(line.split()[0] == "bound" and line.endswith(f"best {bound.best_value:.4g}")
               for line in overview), overview
    # A study without constraints shows none of it.
    free_status = hp("status", "free", "--storage", url, cwd=project).stdout
    assert "constraints" not in free_status and "feasible" not in free_status


def test_when_no_trial_is_feasible_best_says_so(project, capsys):
    url = f"sqlite:///{project / 'n.db'}"
    spec = study("none", budget={"trials": 3, "epochs": 1},
                 constraints=[{"metric": "size", "max": -1}])
    results = search.tune(spec, storage=url, show_progress=False)
    assert results.counts["complete"] == 3 and results.best_trial is None
    assert results.best_params is None and results.best_value is None
    assert show_best("none", url) == 1
    line = ("error: study 'none': none of the 3 complete trials meets the constraints "
            "(size <= -1)")
    assert capsys.readouterr().err.strip() == line
    loaded = optuna.load_study(study_name="none", storage=url)
    assert all(t.state == TrialState.COMPLETE and not is_feasible(t) for t in loaded.trials)
    data = status_data(loaded, parse_spec(spec))
    assert data["best"] == [] and data["constraints"]["feasible"] == 0
    with pytest.raises(SearchError, match=r"study 'none': none of its 3 complete trials meets "
                                          r"the constraints .*retrain one anyway with --trial N"):
        chosen_trial(loaded, None)
    assert chosen_trial(loaded, 1).number == 1  # --trial still picks any finished trial
