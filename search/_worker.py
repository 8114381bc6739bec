"""A worker: runs trials of one study until the global budget is met.

The budget counts COMPLETE + PRUNED trials of every worker. Before each trial the worker counts
what is finished and what is running: if the running ones would meet the budget it waits rather
than start another (so N workers do not overshoot), and if one of them dies its retry shows up as
a WAITING trial that a waiting worker picks up.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search._errors import SearchError
from search._study import Counts, budget_of, count_trials

if TYPE_CHECKING:
    import optuna

    import trainers
    from search._spec import StudySpec

POLL_S = 1.0


class WorkerError(SearchError):
    """The worker gave up (for instance after too many failed trials in a row)."""


@dataclass
class WorkerSummary:
    trials: int = 0
    failed_in_row: int = 0
    stopped: str = ""  # why the worker stopped: budget, timeout, failures


def run_worker(
    study: optuna.Study,
    spec: StudySpec,
    *,
    device: str | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    on_epoch: Callable[[int, trainers.EpochMetrics], None] | None = None,
    on_wait: Callable[[Counts], None] | None = None,
) -> WorkerSummary:
    """Run trials until the study's budget is met or `timeout_s` passes; return a summary."""
    import optuna
    from optuna.trial import TrialState

    from search._objective import Objective

    checkpoint_root = spec.run.checkpoint_dir or "checkpoints"
    objective = Objective(spec, device=device, threads=threads, checkpoint_root=checkpoint_root,
                          on_epoch=on_epoch)
    summary = WorkerSummary()
    deadline = time.monotonic() + timeout_s if timeout_s else math.inf
    # Optuna logs every trial at INFO; the progress display says it better.
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        summary.trials += 1
        summary.failed_in_row = summary.failed_in_row + 1 if trial.state == TrialState.FAIL else 0
        if on_trial is not None:
            on_trial(study, trial)

    while True:
        budget = budget_of(study, spec)
        counts = count_trials(study)
        if counts.finished >= budget:
            summary.stopped = "budget"
            break
        if time.monotonic() >= deadline:
            summary.stopped = "timeout"
            break
        if counts.finished + counts.running >= budget and counts.waiting == 0:
            # The last trials are running elsewhere. Fail the stale ones (dead workers) so
            # their retries get queued, then look again.
            optuna.storages.fail_stale_trials(study)
            if on_wait is not None:
                on_wait(counts)
            time.sleep(POLL_S)
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial],
                       gc_after_trial=False)
        if summary.failed_in_row >= spec.run.max_failures_in_row:
            summary.stopped = "failures"
            raise WorkerError(
                f"{summary.failed_in_row} trials failed in a row; stopping this worker rather "
                "than burning the budget on a broken setup (see `hpsearch status "
                f"{spec.name}` for the reasons)"
            )
    return summary


def quiet_optuna_warnings() -> None:
    """Experimental-feature warnings (heartbeats, retries) are ours to know, not the user's."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("optuna").setLevel(logging.WARNING)
