"""hpsearch's manners as a library: its warnings are records of `hpsearch.*` loggers, and
`search.tune` leaves Optuna's logging as the program set it; the command line prints the same
warnings as it always did, and hides Optuna's INFO lines.

Real studies on SQLite, a function that reports its last epoch twice (`Trial.report` warns
once); the command line and a program without logging run in their own processes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

import search

HPSEARCH = str(Path(sys.executable).with_name("hpsearch"))
MODULE = "logging_trainer"  # a name of its own: other tests import their own `usercode`
CODE = '''
def twice(params, trial):
    for epoch in (1, 2, 2):  # the last epoch reported again, as Hugging Face's evaluate() does
        trial.report(epoch, score=params["lr"] + 1.0 / epoch)
    return params["lr"]
'''
REPEATED = "trial #{}: epoch 2 was reported already"


def study(name: str, *, trials: int = 1) -> dict:
    return {"name": name, "trainer": f"{MODULE}:twice", "objective": {"metric": "score"},
            "budget": {"trials": trials, "epochs": 2}, "sampler": {"type": "random", "seed": 0},
            "pruner": {"type": "none"}, "space": {"lr": {"low": 1e-3, "high": 0.1, "log": True}}}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder holding the trainer's module, importable from here and from processes
    started there."""
    (tmp_path / f"{MODULE}.py").write_text(CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def optuna_level():
    """Optuna's verbosity as it was before the test, put back after it."""
    before = optuna.logging.get_verbosity()
    yield
    optuna.logging.set_verbosity(before)


def logging_state() -> tuple:
    root, ours = logging.getLogger(), logging.getLogger("hpsearch")
    return (optuna.logging.get_verbosity(), logging.getLogger("optuna").level,
            logging.getLogger("optuna").handlers[:], root.level, root.handlers[:],
            ours.level, ours.handlers[:])


@pytest.mark.parametrize("verbosity", [optuna.logging.INFO,  # Optuna's default
                                       optuna.logging.ERROR])  # a program's own choice
def test_tune_leaves_optuna_and_the_root_logger_as_the_program_set_them(folder, optuna_level,
                                                                       verbosity):
    optuna.logging.set_verbosity(verbosity)
    before = logging_state()
    results = search.tune(study(f"manners-{verbosity}"), storage=f"sqlite:///{folder / 's.db'}",
                          show_progress=False)
    assert results.counts["complete"] == 1
    assert logging_state() == before
    assert optuna.logging.get_verbosity() == verbosity


def test_a_warning_inside_tune_is_a_record_of_an_hpsearch_logger(folder, caplog):
    with caplog.at_level(logging.WARNING):
        search.tune(study("manners-record", trials=2), storage=f"sqlite:///{folder / 's.db'}",
                    show_progress=False)
    repeated = [r for r in caplog.records if "was reported already" in r.getMessage()]
    assert [r.getMessage().split(";")[0] for r in repeated] == [REPEATED.format(0),
                                                                REPEATED.format(1)]
    assert {(r.name, r.levelno) for r in repeated} == {("hpsearch.trial", logging.WARNING)}
    assert not [r for r in caplog.records if r.name.startswith("optuna")
                and r.levelno >= logging.WARNING]  # nothing of Optuna's to warn about


def test_the_command_line_prints_the_warning_once_and_no_optuna_lines(folder):
    import yaml

    (folder / "s.yaml").write_text(yaml.safe_dump(study("manners-cli", trials=2)))
    run = subprocess.run([HPSEARCH, "run", "s.yaml", "--storage", "sqlite:///cli.db"],
                         cwd=folder, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for number in (0, 1):
        line = f"warning: {REPEATED.format(number)}; this and any later repeat are ignored"
        assert run.stderr.count(line) == 1, run.stderr
    said = run.stdout + run.stderr
    assert "[I " not in said and "ExperimentalWarning" not in said, said  # Optuna's, hidden


def test_a_program_without_logging_sees_the_warning_as_the_command_line_prints_it(folder):
    program = textwrap.dedent(f'''
        import logging, optuna, search
        import {MODULE}
        spec = {study("manners-program")!r}
        spec["trainer"] = {MODULE}.twice
        search.tune(spec, storage="sqlite:///p.db", show_progress=False)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # Optuna's default
        assert not logging.getLogger("hpsearch").handlers  # printed for the run only
    ''')
    run = subprocess.run([sys.executable, "-c", program], cwd=folder, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count(f"warning: {REPEATED.format(0)}") == 1, run.stderr
    # Optuna's own line, at the verbosity the program left it: Optuna's to show, not ours.
    assert "A new study created in RDB with name: manners-program" in run.stderr
