"""What `run` shows: a line per finished trial, a live bar, and the best trial at the end."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from search._text import fmt
from search.spec import (
    base_train_config,
    best_trials,
    labels,
    measured,
    params_from_optuna,
    sampler_outlook,
)

if TYPE_CHECKING:
    import optuna

    import trainers
    from search.spec import StudySpec
    from search.storage import Counts
    from search.trial import TrialOutcome

def params_text(params: dict[str, Any], limit: int = 8) -> str:
    items = [f"{k}={fmt(v)}" for k, v in params.items()]
    more = f" (+{len(items) - limit})" if len(items) > limit else ""
    return " ".join(items[:limit]) + more

def flat_params(spec: StudySpec, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's params as trainer knobs with real values (batch_size, not log2_batch_size)."""

    return params_from_optuna(spec, trial.params)

def outcome_from_frozen(spec: StudySpec, t: optuna.trial.FrozenTrial) -> TrialOutcome:
    """How a finished trial ended, read back from the storage."""

    from search.trial import TrialOutcome  # with the worker's modules (torch): a run's display

    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    return TrialOutcome(
        number=t.number,
        state=t.state.name,
        values=list(t.values) if t.values is not None else None,
        last_value=last,
        params=flat_params(spec, t),
        epochs_run=int(t.user_attrs.get("epochs_run", len(t.intermediate_values))),
        seconds=float(t.user_attrs.get("seconds", 0.0)),
        ended=str(t.user_attrs.get("ended", "worker died (no heartbeat)")),
    )

def make_console() -> Console:
    """The console every view prints to."""
    # soft_wrap: a CI log or a pipe keeps one line per trial instead of wrapping at 80 columns.
    return Console(highlight=False, soft_wrap=True)

class RunDisplay:
    """The live view of one `run`: readable in a terminal and in a CI log alike."""

    def __init__(self, spec: StudySpec, budget: int, *, console: Console | None = None) -> None:
        self.spec = spec
        self.budget = budget
        self.console = console or Console(highlight=False)
        self.metric = spec.objective.metric_names[0]
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TextColumn("{task.fields[running]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task(spec.name, total=budget, best="", running="")
        self._shown: set[int] = set()

    def __enter__(self) -> RunDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start(self, counts: Counts, resumed: bool, study: optuna.Study | None = None) -> None:
        what = "resuming" if resumed else "starting"
        self.console.print(
            f"{what} study [bold]{self.spec.name}[/]: {counts.finished}/{self.budget} trials "
            f"finished, {self.spec.budget.epochs} epochs each, sampler {self.spec.sampler.type}, "
            f"pruner {self.spec.pruner.label}, objective "
            f"{' & '.join(self.spec.objective.metric_names)}"
        )
        outlook = sampler_outlook(self.spec)
        if outlook is not None:
            self.console.print(outlook, markup=False)

        weights = base_train_config(self.spec).model.weights if self.spec.trainer is None else None
        if weights:
            self.console.print(f"fine-tuning from [bold]{weights}[/]: what loading did (heads "
                               f"re-initialized) is each trial's user attr weights_notes")
        self.progress.update(self.task, completed=counts.finished)
        if study is not None:  # trials finished before this run are not news
            self._shown = {t.number for t in study.get_trials(deepcopy=False)
                           if t.state.is_finished()}

    def epoch(self, number: int, m: trainers.EpochMetrics) -> None:
        """An epoch of a running trial: the built-in trainer's metrics, or what a user's
        trainer reported (`m.metrics`)."""
        reported = getattr(m, "metrics", None)
        shown = (" ".join(f"{k} {fmt(v)}" for k, v in list(reported.items())[:3])
                 if isinstance(reported, dict)
                 else f"val_loss {m.val_loss:.4f} acc {m.val_accuracy:.3f}")
        self.progress.update(
            self.task, running=f"#{number} epoch {m.epoch}/{self.spec.budget.epochs} {shown}")

    def trial(self, study: optuna.Study, outcome: TrialOutcome, counts: Counts) -> None:
        state = outcome.state
        value = ""
        if outcome.values is not None:
            value = " ".join(f"{m} {fmt(v)}" for m, v in
                             zip(self.spec.objective.metric_names, outcome.values, strict=True))
        elif outcome.last_value is not None:
            value = f"{self.metric} {fmt(outcome.last_value)}"
        note = f"  [dim]{outcome.ended}[/]" if state != "COMPLETE" else ""
        color = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(state, "white")
        timing = f"{outcome.epochs_run} ep {outcome.seconds:.3g}s"
        self.console.print(
            f"#{outcome.number:<4} [{color}]{state:<8}[/] {value:<22} {timing:<12} "
            f"{params_text(outcome.params)}{note}"
        )
        self.progress.update(self.task, completed=counts.finished, running="",
                             best=self.best_text(study))

    def poll(self, study: optuna.Study, counts: Counts) -> None:
        """Show what other processes did since the last poll (the multi-worker view)."""

        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state.is_finished() and t.number not in self._shown:
                self._shown.add(t.number)
                self.trial(study, outcome_from_frozen(self.spec, t), counts)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        self.progress.update(
            self.task, completed=counts.finished, best=self.best_text(study),
            running=", ".join(f"#{t.number} ep {len(t.intermediate_values)}"
                              for t in running[:6]),
        )

    def best_text(self, study: optuna.Study) -> str:
        try:
            if len(study.directions) > 1:
                return f"pareto {len(study.best_trials)}"
            best = study.best_trial
        except ValueError:
            return ""
        return f"best {self.metric} {fmt(best.value)} (#{best.number})"

    def finish(self, study: optuna.Study, counts: Counts, storage_hint: str,
               dashboard_url: str) -> None:
        elapsed = time.monotonic() - self.started
        self.console.print(
            f"\n{counts.finished}/{self.budget} trials finished ({counts.complete} complete, "
            f"{counts.pruned} pruned, {counts.failed} failed) in {elapsed:.0f} s"
        )
        print_best(study, self.spec, self.console)
        name, url = self.spec.name, storage_hint
        self.console.print("\nnext:")
        for command, why in (
            (f"hpsearch status {name}{url}", "trials at a glance"),
            (f"hpsearch dashboard{url}", "curves and plots in the browser"),
            (f"hpsearch best {name}{url} --format yaml > best.yaml", "export the best config"),
            ("python -m trainers best.yaml", "and train it again"),
            (f"hpsearch retrain {name}{url}", "train+val, then the test set, once"),
            (f"hpsearch report {name}{url} --out report.html", "one offline HTML report"),
        ):
            if command.startswith("python -m trainers") and self.spec.trainer is not None:
                continue  # the built-in trainer's; a user's trainer retrains through retrain
            self.console.print(f"  {command:<58} [dim]# {why}[/]")

def print_best(study: optuna.Study, spec: StudySpec, console: Console) -> None:
    """The best trial (or Pareto front) as a table."""

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        console.print("no trial completed yet: nothing to call best")
        return
    trials = best_trials(study)  # the feasible ones, where the study has constraints:
    if not trials:
        bounds = ", ".join(labels(spec.constraints))
        console.print(f"no complete trial meets the constraints ({bounds}): nothing to call best")
    for trial in trials:
        table = Table(title=f"best trial #{trial.number}", show_header=False, title_justify="left")
        table.add_column("key", style="bold")
        table.add_column("value")
        for metric, value in zip(spec.objective.metric_names, trial.values, strict=True):
            table.add_row(metric, fmt(value))
        history = trial.user_attrs.get("history") or []
        if history and "val_accuracy" in history[-1] and \
                "val_accuracy" not in spec.objective.metric_names:
            table.add_row("val_accuracy", fmt(history[-1].get("val_accuracy")))
        for label, value in measured(spec.constraints, trial.user_attrs).items():
            table.add_row(label, f"{fmt(value)} (feasible)")
        for key, value in flat_params(spec, trial).items():
            table.add_row(key, fmt(value))
        table.add_row("epochs", str(trial.user_attrs.get("epochs_run", "")))
        console.print(table)
