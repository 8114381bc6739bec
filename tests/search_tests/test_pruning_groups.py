"""`pruner.within`: a trial is judged only against the trials that share its values of the named
parameters, with every Optuna pruner, through hpsearch's storage view (`GroupedPruner`).

The Hyperband and successive-halving cases are also canaries: those pruners read the study's
trials through a bracket study built on its storage, and write their rungs there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from search.storage import GroupedPruner
from tests.search_tests.studies import study_data

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
SCHEDULES = CategoricalDistribution(["warmup", "constant"])


def _median_study(pruner: optuna.pruners.BasePruner, url: str | None) -> optuna.Study:
    """Three finished trials of each schedule: a warmup run trails at step 0, ends ahead."""
    study = optuna.create_study(storage=url, pruner=pruner)
    for schedule, first, last in (("constant", 1.0, 1.0), ("warmup", 5.0, 0.5)):
        for _ in range(3):
            study.add_trial(create_trial(params={"sched": schedule},
                                         distributions={"sched": SCHEDULES}, value=last,
                                         intermediate_values={0: first, 1: last}))
    return study

def _verdict(study: optuna.Study, schedule: str, value: float) -> bool:
    study.enqueue_trial({"sched": schedule})
    trial = study.ask({"sched": SCHEDULES})
    trial.report(value, 0)
    verdict = bool(trial.should_prune())
    study.tell(trial, state=TrialState.PRUNED)
    return verdict

@pytest.mark.parametrize("url", [None, "sqlite"])
def test_a_trial_is_judged_against_its_own_group_only(tmp_path: Path, url: str | None) -> None:
    url = url and f"sqlite:///{tmp_path / 'g.db'}"
    median = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    grouped = _median_study(GroupedPruner(median, ["sched"]), url)
    # 4.0 at step 0: under the warmup runs' median (5.0), over every trial's (3.0).
    assert _verdict(grouped, "warmup", 4.0) is False
    assert _verdict(grouped, "constant", 4.0) is True
    plain = _median_study(median, None)
    assert _verdict(plain, "warmup", 4.0) is True

def _search(pruner: optuna.pruners.BasePruner, name: str) -> optuna.Study:
    """A warmup schedule trails for its first 3 steps of 9, then ends at half a constant's loss."""
    def objective(trial: optuna.Trial) -> float:
        schedule = trial.suggest_categorical("sched", ["warmup", "constant"])
        noise = trial.suggest_float("noise", 0.0, 1.0)
        for step in range(1, 10):
            value = (1.0 if schedule == "constant" else 3.0 if step < 4 else 0.5) * (1 + noise)
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    # Named: Hyperband picks a trial's bracket from the study's name and the trial's number.
    study = optuna.create_study(study_name=name, pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=40)
    return study

@pytest.mark.parametrize("make", [
    lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3),
    lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
], ids=["hyperband", "asha"])
def test_rung_pruners_judged_within_groups_find_the_late_starter(make) -> None:
    plain = _search(make(), "late-starter")
    grouped = _search(GroupedPruner(make(), ["sched"]), "late-starter")

    def finished(study: optuna.Study, schedule: str) -> int:
        return sum(t.state == TrialState.COMPLETE and t.params["sched"] == schedule
                   for t in study.trials)

    # Judged against every trial, the warmup runs are cut at the early rungs (Hyperband's
    # last bracket, which prunes at the end alone, still finishes a few).
    assert finished(plain, "warmup") * 2 <= finished(grouped, "warmup")
    assert grouped.best_params["sched"] == "warmup" and grouped.best_value < 1.0
    # The rungs the pruner records on each trial went through the view to the storage.
    assert any(key.startswith("completed_rung_")
               for t in grouped.trials for key in t.system_attrs)

def test_a_study_file_with_within_runs_alone_and_packed(tmp_path: Path) -> None:
    data = study_data("grouped", trials=8, epochs=3, pruner={"type": "median",
                                                              "within": ["scheduler"]},
                      space={"lr": {"low": 1e-3, "high": 0.3, "log": True},
                             "scheduler": {"choices": ["constant", "onecycle"]}})
    study = tmp_path / "grouped.yaml"
    study.write_text(yaml.safe_dump(data))
    checked = subprocess.run([HPSEARCH, "validate", str(study)], capture_output=True,
                             text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "pruner median within scheduler" in checked.stdout
    for pack in ("1", "4"):
        url = f"sqlite:///{tmp_path / f'pack{pack}.db'}"
        run = subprocess.run([HPSEARCH, "run", str(study), "--storage", url, "--pack", pack],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        trials = optuna.load_study(study_name="grouped", storage=url).trials
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 8
