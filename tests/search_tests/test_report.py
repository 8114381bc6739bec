"""`hpsearch report` and `hpsearch status --json`: real studies run by the real worker.

The commands run in-process through `search.cli.main` (the same argument parsing, error
handling and exit codes as the console script, without a second interpreter start per test).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from optuna.trial import TrialState

import search.cli
from search.cli import Report
from search.run import create_or_load
from search.spec import parse_spec
from search.storage import open_storage, quiet_optuna_warnings
from search.workers import WorkerError, run_worker
from tests.search_tests import studies
from tests.search_tests.studies import OPTIMIZER_LR_BATCH, WEIGHT_DECAY_GRID

quiet_optuna_warnings()
FIGURES = ("Optimization history", "Parameter importances", "Parallel coordinates",
           "Validation loss of every trial", "lr x batch_size", "lr x weight_decay", "Slices",
           "curves and gradient norms")

def _section(page: str, heading: str) -> str:
    """The body of the section whose heading contains `heading`."""
    match = re.search(rf"<h2>[^<]*{re.escape(heading)}[^<]*</h2>(.*?)</section>", page, re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)

@pytest.fixture
def cli(monkeypatch):
    """`hpsearch ARGS...` in-process: (exit code, stdout, stderr)."""
    if not any(c.name == "report" for c in search.cli.COMMANDS):  # until cli.py lists it
        monkeypatch.setattr(search.cli, "COMMANDS", [*search.cli.COMMANDS, Report()])

    def run(*args: str) -> int:
        return search.cli.main(list(args))

    return run

def spec_data(name: str, tmp: Path, **changes) -> dict:
    space = {**OPTIMIZER_LR_BATCH, **WEIGHT_DECAY_GRID}
    return studies.searched(name, tmp, **{"trials": 8, "space": space, **changes})


def make_study(tmp: Path, data: dict, *, run: bool = True):
    url = f"sqlite:///{tmp / 'studies.db'}"
    spec = parse_spec(data)
    study = create_or_load(spec, open_storage(url))
    if run:
        run_worker(study, spec, device="cpu", artifacts=False)
    return study, spec, url

@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    return make_study(tmp, spec_data("rep", tmp))

def test_report_is_one_offline_html_file_with_every_section(searched, cli, tmp_path, capsys):
    study, spec, url = searched
    out = tmp_path / "sub" / "report.html"
    assert cli("report", "rep", "--storage", url, "--out", str(out)) == 0
    assert f"wrote {out} (8 trials" in capsys.readouterr().out
    page = out.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"http", page)  # nothing fetched
    assert "Plotly.newPlot" in page and len(page) > 1_000_000  # plotly.js itself is inline
    for heading in FIGURES:
        section = _section(page, heading)
        assert "plotly-graph-div" in section and "Not shown" not in section, heading
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE),
               key=lambda t: t.value)
    assert f"Best trial #{best.number}: curves and gradient norms" in page
    assert f"<td>#{best.number}</td>" in _section(page, "Top trials")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and f"trial #{pruned[0].number} (PRUNED: pruned at epoch" in page

def test_report_shows_the_retrain_result(searched, cli, tmp_path, capsys):
    study, spec, url = searched
    study.set_user_attr("hpsearch_retrain", {"test_accuracy": {"mean": 0.8912, "std": 0.0021},
                                             "test_loss": {"mean": 0.31, "std": 0.01},
                                             "seeds": 3, "out": "retrain-out", "trial": 1,
                                             "epochs": 3})
    try:
        assert cli("report", "rep", "--storage", url, "--out", str(tmp_path / "r.html")) == 0
        page = (tmp_path / "r.html").read_text()
        assert ("Retrain: trial #1, 3 epochs on train+val: test_accuracy 0.8912 ± 0.0021, "
                "test_loss 0.31 ± 0.01 over 3 seeds (out: retrain-out)") in page
        capsys.readouterr()
        assert cli("status", "rep", "--storage", url) == 0
        assert "retrain: trial #1, 3 epochs on train+val: test_accuracy 0.8912" in (
            capsys.readouterr().out)
        capsys.readouterr()
        assert cli("status", "rep", "--storage", url, "--json") == 0
        assert json.loads(capsys.readouterr().out)["retrain"]["seeds"] == 3
    finally:
        study.set_user_attr("hpsearch_retrain", None)

def test_status_json_has_every_field(searched, cli, capsys):
    study, spec, url = searched
    assert cli("status", "rep", "--storage", url, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert {"study", "objective", "budget", "counts", "best", "running", "failures", "pruning",
            "retrain"} <= set(data)
    assert set(data["counts"]) == {"complete", "pruned", "failed", "running", "waiting",
                                   "finished"}
    assert data["counts"]["finished"] == 8 and data["retrain"] is None
    best = data["best"][0]
    assert {"trial", "values", "params", "val_accuracy", "config"} <= set(best)
    assert {"optimizer", "lr", "batch_size"} <= set(best["params"])
    assert set(data["pruning"]) >= {"epochs_run", "epochs_full_budget", "epochs_saved",
                                    "saved_fraction"}
    assert data["pruning"]["epochs_full_budget"] == 8 * 3

def test_report_on_an_empty_study_says_so_in_one_line(tmp_path, cli, capsys):
    make_study(tmp_path, spec_data("empty", tmp_path), run=False)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert cli("report", "empty", "--storage", url, "--out", str(tmp_path / "r.html")) == 1
    err = capsys.readouterr().err
    assert err == ("error: study 'empty' has no completed or pruned trial yet: nothing to "
                   "report\n")
    assert not (tmp_path / "r.html").exists()

def test_report_on_failed_trials_only_says_so_in_one_line(tmp_path, cli, capsys, monkeypatch):
    monkeypatch.setenv("HPSEARCH_DATA", str(tmp_path / "empty"))
    data = spec_data("failing", tmp_path, data={"dataset": "mnist"},
                     run={"max_failures_in_row": 2, "checkpoint_dir": str(tmp_path / "c")})
    study, spec, url = make_study(tmp_path, data, run=False)
    with pytest.raises(WorkerError):
        run_worker(study, spec, device="cpu", artifacts=False)
    capsys.readouterr()
    assert cli("report", "failing", "--storage", url, "--out", str(tmp_path / "r.html")) == 1
    assert capsys.readouterr().err == (
        "error: study 'failing' has no completed or pruned trial yet (2 failed; see "
        "`hpsearch status failing`): nothing to report\n")

def test_report_of_a_multi_objective_study_shows_the_pareto_front(tmp_path, cli, capsys):
    data = spec_data("multi", tmp_path, objective={"metrics": ["val_loss", "epoch_seconds"]},
                     pruner={"type": "none"}, budget={"trials": 5, "epochs": 2},
                     sampler={"type": "nsga2", "seed": 0})
    make_study(tmp_path, data)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert cli("report", "multi", "--storage", url, "--out", str(tmp_path / "m.html")) == 0
    page = (tmp_path / "m.html").read_text()
    assert "plotly-graph-div" in _section(page, "Pareto front")
    assert "Pareto-optimal trials" in page and "epoch_seconds" in page

def test_report_of_an_unknown_study_exits_2(searched, cli, capsys, tmp_path):
    study, spec, url = searched
    assert cli("report", "nope", "--storage", url, "--out", str(tmp_path / "x.html")) == 2
    assert "no study named 'nope'" in capsys.readouterr().err

def test_status_shows_running_trials_and_failures_with_reasons(tmp_path, cli, capsys):
    from search.spec import suggest

    study, spec, url = make_study(tmp_path, spec_data("live", tmp_path), run=False)
    running = study.ask()
    suggest(running, spec)
    running.set_user_attr("host", "gpu-box-3")
    running.set_user_attr("device", "cuda:1")
    running.report(0.9, 1)
    running.report(0.7, 2)
    failed = study.ask()
    suggest(failed, spec)
    failed.set_user_attr("ended", "error: RuntimeError: CUDA out of memory")
    study.tell(failed, state=TrialState.FAIL)
    assert cli("status", "live", "--storage", url, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["running"]
    assert (row["trial"], row["host"], row["device"], row["epoch"]) == (0, "gpu-box-3",
                                                                        "cuda:1", 2)
    assert row["elapsed_s"] >= 0 and "lr" in row["params"]
    assert data["failures"] == [{"trial": 1, "reason": "error: RuntimeError: CUDA out of memory",
                                 "host": None}]
    assert cli("status", "live", "--storage", url) == 0
    text = capsys.readouterr().out
    assert "gpu-box-3" in text and "cuda:1" in text and "2/3" in text
    assert "CUDA out of memory" in text

def test_report_of_pruned_trials_only_shows_their_curves_and_says_what_is_missing(tmp_path):
    from search.spec import suggest
    from search.views import build_report

    study, spec, url = make_study(tmp_path, spec_data("cut", tmp_path), run=False)
    for k in range(3):
        trial = study.ask()
        suggest(trial, spec)
        trial.set_user_attr("history", [{"epoch": 1, "val_loss": 2.0 + k, "train_loss": 2.1}])
        trial.set_user_attr("ended", "pruned at epoch 1")
        study.tell(trial, state=TrialState.PRUNED)
    page = build_report(study, spec, storage=url)
    assert "plotly-graph-div" in _section(page, "Validation loss of every trial")
    assert ("Not shown: the optimization history needs at least 1 completed trial (this study "
            "has 0).") in _section(page, "Optimization history")
    assert "No completed trial yet." in _section(page, "Top trials")
