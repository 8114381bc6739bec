"""Samplers and pruners beyond the built-in names: a class by import path (`pkg.module:Class`),
and the pruners `threshold`, `wilcoxon` and `patient` (wrapping another pruner spec).

Real Optuna throughout: the function studies below run in this process (`search.tune`, one
worker) in a second or two; the command line is run where the message or the working
directory's import is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

import search
from search import SpecError
from search.spec import build_pruner, parse_spec
from search.views import choices_text

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))

# A sampler of the user's, in a module of the working directory (as `trainer: mine:fit`).
MINE = '''
import json
import optuna


class Recorded(optuna.samplers.RandomSampler):
    """Random; writes what it was built with, so the test sees the seed and the option."""

    def __init__(self, seed=None, *, scale=1.0):
        super().__init__(seed=seed)
        with open("built.jsonl", "a") as f:
            f.write(json.dumps({"seed": seed, "scale": scale}) + "\\n")


class Broken(optuna.samplers.RandomSampler):
    def __init__(self):
        raise RuntimeError("no licence server")


def not_a_class():
    pass


def fit(params, trial):
    for epoch in range(1, trial.epochs + 1):
        trial.report(epoch, score=(params["x"] - 0.3) ** 2 + 1.0 / epoch)
'''


def curve(params: dict[str, Any], trial: Any) -> None:
    """x < 0.5 learns (x + 1/epoch); 0.5 ≤ x < 0.85 trails but improves; x ≥ 0.85 gets worse
    every epoch. Every reported value is a step of the pruner's."""
    x = params["x"]
    for epoch in range(1, trial.epochs + 1):
        if x < 0.5:
            loss = x + 1.0 / epoch
        elif x < 0.85:
            loss = 3.0 - 0.1 * epoch
        else:
            loss = 2.0 + 0.1 * epoch
        trial.report(epoch, score=loss)


def hp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPSEARCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def study(name: str, pruner: dict[str, Any], xs: list[float], *, epochs: int = 4,
          groups: list[str] | None = None) -> dict[str, Any]:
    """A function study of `curve` that runs the enqueued `xs` in order (in `groups`, the
    values of a searched choice `group`), one worker."""
    space: dict[str, Any] = {"x": {"low": 0.0, "high": 1.0}}
    enqueue: list[dict[str, Any]] = [{"x": x} for x in xs]
    if groups is not None:
        space["group"] = {"choices": sorted(set(groups))}
        enqueue = [{**e, "group": g} for e, g in zip(enqueue, groups, strict=True)]
    return {"name": name, "trainer": curve, "objective": {"metric": "score"},
            "budget": {"trials": len(xs), "epochs": epochs}, "sampler": {"type": "random"},
            "pruner": pruner, "space": space, "enqueue": enqueue}


def outcomes(folder: Path, spec: dict[str, Any]) -> list[tuple[str, int]]:
    """Each trial's state and last reported epoch, in order."""
    url = f"sqlite:///{folder / 's.db'}"
    search.tune(spec, storage=url, show_progress=False)
    trials = optuna.load_study(study_name=spec["name"], storage=url).trials
    return [(t.state.name, max(t.intermediate_values)) for t in trials]


def write_study(folder: Path, sampler: dict[str, Any], **more: Any) -> Path:
    (folder / "mine.py").write_text(MINE)
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bypath", "trainer": "mine:fit", "objective": {"metric": "score"},
        "budget": {"trials": 3, "epochs": 2}, "sampler": sampler, "pruner": {"type": "none"},
        "space": {"x": {"low": 0.0, "high": 1.0}}, **more}))
    return path


# --------------------------------------------------------------------------- samplers by path
@pytest.mark.parametrize("sampler", [
    {"type": "optuna.samplers:QMCSampler", "seed": 3, "options": {"scramble": True}},
    {"type": "mine:Recorded", "seed": 3, "options": {"scale": 2.0}},
])
def test_a_sampler_by_import_path_validates_and_runs_from_the_working_directory(
        tmp_path: Path, sampler: dict[str, Any]) -> None:
    write_study(tmp_path, sampler)
    checked = hp("validate", "s.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert f"sampler {sampler['type']}, pruner none" in checked.stdout
    ran = hp("run", "s.yaml", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("starting study bypath: 0/3 trials finished, 2 epochs each, "
                                 f"sampler {sampler['type']}, pruner none")
    assert "3/3 trials finished (3 complete" in ran.stdout
    if sampler["type"] == "mine:Recorded":  # built at validate and for the run, seeded
        built = [json.loads(line) for line in (tmp_path / "built.jsonl").read_text().splitlines()]
        assert built and built[0] == {"seed": 3, "scale": 2.0}
        assert all(b["scale"] == 2.0 and b["seed"] is not None for b in built)


@pytest.mark.parametrize(("sampler_type", "message"), [
    ("nosuchmodule:Sampler", "sampler.type: nosuchmodule:Sampler: cannot import "
                             "'nosuchmodule' (ModuleNotFoundError: No module named "
                             "'nosuchmodule')"),
    ("optuna.samplers:NoSampler", "sampler.type: optuna.samplers:NoSampler: module "
                                  "'optuna.samplers' has no attribute 'NoSampler'"),
    ("optuna.pruners:MedianPruner", "sampler.type: optuna.pruners:MedianPruner: expected a "
                                    "subclass of optuna.samplers.BaseSampler, got a pruner "
                                    "class"),
])
def test_validate_refuses_a_sampler_path_with_one_line(tmp_path: Path, sampler_type: str,
                                                       message: str) -> None:
    write_study(tmp_path, {"type": sampler_type})
    checked = hp("validate", "s.yaml", cwd=tmp_path)
    assert checked.returncode == 2
    assert checked.stderr == f"error: s.yaml: {message}\n"


BASE = {"name": "x", "trainer": "mine:fit", "objective": {"metric": "score"},
        "space": {"x": {"low": 0.0, "high": 1.0}}}


@pytest.mark.parametrize(("section", "message"), [
    ({"sampler": {"type": "mine:not_a_class"}},
     "sampler.type: mine:not_a_class: expected a subclass of optuna.samplers.BaseSampler, "
     "got a function"),
    ({"sampler": {"type": "mine:Broken"}},
     "sampler.type: mine:Broken raised RuntimeError: no licence server"),
    ({"sampler": {"type": "optuna.study:Study"}},
     "sampler.type: optuna.study:Study: expected a subclass of optuna.samplers.BaseSampler, "
     "got the class Study, not a sampler"),
    ({"sampler": {"type": "mine:Recorded", "options": {"scal": 2}}},
     "sampler.options.scal: unknown option of Recorded, did you mean 'scale'? (expected one "
     "of: scale)"),
    ({"sampler": {"type": "mine:Recorded", "options": {"seed": 2}}},
     "sampler.options.seed: set sampler.seed instead"),
    ({"sampler": {"type": "optuna.samplers:QMCSampler", "options": {"qmc_type": "x"}}},
     "sampler.options: The `qmc_type='x'` is invalid."),
    ({"pruner": {"type": "optuna.pruners:ThresholdPruner"}},
     "pruner.options: optuna.pruners:ThresholdPruner does not accept these options (Either "
     "lower or upper must be specified.)"),
    ({"pruner": {"type": "optuna.samplers:TPESampler"}},
     "pruner.type: optuna.samplers:TPESampler: expected a subclass of "
     "optuna.pruners.BasePruner, got a sampler class"),
])
def test_a_bad_class_or_option_by_path_is_one_spec_error(tmp_path: Path, monkeypatch: Any,
                                                          section: dict, message: str) -> None:
    (tmp_path / "mine.py").write_text(MINE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError) as caught:
        parse_spec({**BASE, **section})
    assert str(caught.value).startswith(f"<spec>: {message}")


# --------------------------------------------------------------------------- pruners
@pytest.mark.parametrize("pruner_type", ["threshold", "optuna.pruners:ThresholdPruner"])
def test_threshold_prunes_the_trial_whose_metric_crosses_upper(tmp_path: Path,
                                                               pruner_type: str) -> None:
    pruner = {"type": pruner_type, "options": {"upper": 2.25}}
    # 0.9 reports 2.1, 2.2, 2.3: pruned at epoch 3; 0.1 stays under 2.25.
    assert outcomes(tmp_path, study("threshold", pruner, [0.1, 0.9])) == [
        ("COMPLETE", 4), ("PRUNED", 3)]


def test_a_patient_median_pruner_waits_out_its_patience(tmp_path: Path) -> None:
    median = {"type": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}}
    pruner = {"type": "patient", "options": {"patience": 1}, "wrapped": median}
    xs = [0.1, 0.2, 0.6, 0.9]
    # The median alone stops both trailing trials at their first epoch; with patience the
    # one that keeps improving runs on, and the one that gets worse is stopped once it has
    # not improved for 1 epoch past its best (epoch 3).
    assert outcomes(tmp_path, study("median", median, xs)) == [
        ("COMPLETE", 4), ("COMPLETE", 4), ("PRUNED", 1), ("PRUNED", 1)]
    assert outcomes(tmp_path, study("patient", pruner, xs)) == [
        ("COMPLETE", 4), ("COMPLETE", 4), ("COMPLETE", 4), ("PRUNED", 3)]


def test_a_patient_pruner_within_groups_asks_the_grouped_median(tmp_path: Path) -> None:
    median = {"type": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}}
    pruner = {"type": "patient", "options": {"patience": 1}, "wrapped": median,
              "within": ["group"]}
    spec = study("grouped", pruner, [0.1, 0.2, 0.9, 0.9], groups=["a", "a", "b", "a"])
    assert parse_spec(spec | {"trainer": "x:y"}).pruner.label == "patient(median) within group"
    # The worsening trial of group b has no peers to be judged against and runs on; the same
    # curve in group a is stopped once patience runs out.
    assert outcomes(tmp_path, spec) == [
        ("COMPLETE", 4), ("COMPLETE", 4), ("COMPLETE", 4), ("PRUNED", 3)]


def test_patience_alone_stops_a_trial_that_gets_worse(tmp_path: Path) -> None:
    alone = {"type": "patient", "options": {"patience": 1}, "wrapped": {"type": "none"}}
    spec = parse_spec(study("alone", alone, [0.1]) | {"trainer": "x:y"})
    assert isinstance(build_pruner(spec), optuna.pruners.PatientPruner)
    assert spec.pruner.label == "patient(none)"
    assert outcomes(tmp_path, study("alone", alone, [0.9, 0.1])) == [
        ("PRUNED", 3), ("COMPLETE", 4)]


def test_wilcoxon_prunes_a_trial_worse_than_the_best_at_every_step(tmp_path: Path) -> None:
    # Each epoch stands for an instance (a fold, a problem): 0.9 trails the best trial on every
    # one, and the signed-rank test says so once it has 4 of them.
    wilcoxon = {"type": "wilcoxon", "options": {"p_threshold": 0.1, "n_startup_steps": 2}}
    assert outcomes(tmp_path, study("wilcoxon", wilcoxon, [0.1, 0.9], epochs=6)) == [
        ("COMPLETE", 6), ("PRUNED", 4)]


def test_list_names_the_new_pruners_and_the_import_path_form() -> None:
    text = choices_text(["samplers", "pruners"])
    assert "built in: hyperband, asha, median, percentile, none, threshold, wilcoxon, patient" \
        in text
    assert "any other: an import path, e.g. sampler.type: mypkg.module:Class (a subclass of " \
        "optuna.samplers.BaseSampler)" in text
