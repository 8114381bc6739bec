"""hpsearch from Python: run a study from a notebook or a script, and read its results.

`tune(spec, ...)` takes a study as a mapping (the study file's contents) or a file's path and
runs it as `hpsearch run` does, with the same storage, workers, budget and retries;
`load_results(name, ...)` reads a study back: the best trial and every trial as a row of real
values (``batch_size: 128``, never ``log2_batch_size``).

Neither touches the program's logging: hpsearch's warnings and notices are records of the
``hpsearch.*`` loggers, printed as the command line prints them only where the program
configured no logging (`search._log.printed`); Optuna's own lines follow
`optuna.logging.set_verbosity`, as the program set it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search._errors import SearchError
from search._log import printed


@dataclass(frozen=True)
class Results:
    """A study's results as plain values."""

    study_name: str
    metrics: list[str]  # the objective's metric names
    directions: list[str]
    # None until a trial completed (or several objectives); with constraints, the best trial
    # that meets them (None while none does), and each row says whether it does ("feasible").
    best_params: dict[str, Any] | None
    best_value: float | None
    best_trial: int | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def dataframe(self) -> Any:
        """The trials as a pandas DataFrame, a row each (``pip install 'hpsearch[pandas]'``)."""
        try:
            import pandas as pd
        except ImportError:
            raise SearchError("Results.dataframe() needs pandas: pip install "
                              "'hpsearch[pandas]' (or use Results.trials, a list of dicts)"
                              ) from None

        return pd.DataFrame(self.trials)


def _spec_of(spec: dict[str, Any] | str | Path) -> Any:
    from search.spec import load_spec, parse_spec

    if isinstance(spec, dict):
        trainer = spec.get("trainer")
        if callable(trainer):  # a function object: stored by its import path
            spec = {**spec, "trainer": f"{trainer.__module__}:{trainer.__qualname__}"}
        return parse_spec(spec, source="<spec>")
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    raise SearchError(f"tune: expected a study as a mapping or a file's path, got "
                      f"{type(spec).__name__}")


@printed()  # hpsearch's warnings shown where the program shows no log records
def tune(spec: dict[str, Any] | str | Path, *, storage: str | None = None,
         workers: int | None = None, gpus: str = "auto", trials_per_gpu: int = 1,
         trials: int | None = None, timeout_s: float | None = None, device: str | None = None,
         show_progress: bool = True) -> Results:
    """Create (or resume) the study and run it until its budget is met; its results.

    `spec["trainer"]` may be the function itself: it is stored by its import path
    (``module:name``), so a function defined in a notebook (``__main__``) runs with one
    worker, in this process; more workers import it, so it must live in a module.
    `storage` is a database URL (default: $HPSEARCH_STORAGE, else sqlite:///hpsearch.db).
    Workers as `hpsearch run` plans them: one per GPU (`gpus`: "auto", "none", "0,1"), or
    `workers` CPU processes (one, in this process, by default). Progress prints as `hpsearch
    run` shows it unless `show_progress` is False. Raises SpecError for a bad study and
    SearchError when the run stops for failures.

    hpsearch's warnings (``warning: trial #3: epoch 2 was reported already; …``) and notices
    are log records of the ``hpsearch.*`` loggers: printed to stderr as `hpsearch run` prints
    them while the program has configured no logging, else handled by its handlers (INFO
    notices need ``logging.getLogger("hpsearch").setLevel(logging.INFO)`` then). Optuna's
    logging is left as the program set it: ``optuna.logging.set_verbosity(
    optuna.logging.WARNING)`` quiets its INFO lines ("A new study created in RDB …").
    """
    from rich.console import Console

    from search.run import Launch, run_study
    from search.spec import check_trainer
    from search.views import RunDisplay, make_console
    from search.workers import plan

    study = _spec_of(spec)
    if study.trainer is not None and isinstance(spec, dict):
        check_trainer(study, source="<spec>")
    slots = plan("none" if workers and gpus == "auto" else gpus,
                 trials_per_gpu=trials_per_gpu, workers=workers)

    def display(s: Any, budget: int) -> Any:
        console = make_console() if show_progress else Console(quiet=True)
        return RunDisplay(s, budget, console=console)

    launch = Launch(storage=storage, trials=trials, timeout_s=timeout_s, device=device,
                    trials_per_gpu=trials_per_gpu)
    code = run_study(launch, slots, spec=study, display=display)
    if code != 0:
        raise SearchError(f"study {study.name!r} stopped with exit code {code} (see the "
                          "messages above; `hpsearch status` shows the failed trials)")
    return load_results(study.name, storage=storage)


@printed()
def load_results(name: str, *, storage: str | None = None) -> Results:
    """A study's results: best params and value, and every trial as a row of real values."""
    from optuna.trial import TrialState

    from search.run import load
    from search.spec import best_trials, is_feasible, params_from_optuna
    from search.storage import count_trials, open_storage

    study, spec = load(name, open_storage(storage, must_exist=True))
    metrics = spec.objective.metric_names
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        values = t.values if t.state == TrialState.COMPLETE and t.values else None
        for i, metric in enumerate(metrics):
            row[metric] = values[i] if values else None
        if spec.constraints:  # whether it meets them; None until it finished
            row["feasible"] = is_feasible(t) if t.state in (
                TrialState.COMPLETE, TrialState.PRUNED) else None
        row.update(params_from_optuna(spec, t.params))
        row["epochs_run"] = t.user_attrs.get("epochs_run")
        row["seconds"] = t.user_attrs.get("seconds")
        row["ended"] = t.user_attrs.get("ended")
        row["started"] = t.datetime_start.isoformat() if isinstance(
            t.datetime_start, dt.datetime) else None
        rows.append(row)
    best_params = best_value = best_trial = None
    best_of = best_trials(study)  # the best feasible trial, where there are constraints:
    if best_of and len(metrics) == 1:
        best = best_of[0]
        best_params = {**dict(spec.fixed if spec.trainer is not None else {}),
                       **params_from_optuna(spec, best.params)}
        best_value, best_trial = best.value, best.number
    counts = count_trials(study)
    return Results(study_name=spec.name, metrics=list(metrics),
                   directions=list(spec.objective.direction_names), best_params=best_params,
                   best_value=best_value, best_trial=best_trial, trials=rows,
                   counts={"complete": counts.complete, "pruned": counts.pruned,
                           "failed": counts.failed, "running": counts.running,
                           "waiting": counts.waiting})
