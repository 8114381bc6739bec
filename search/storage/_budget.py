"""The global trial budget: trials counted by state, and the one rule that admits a new trial.

The budget counts COMPLETE + PRUNED trials of every worker; it is stored on the study (`run
--trials` moves it for every worker). A new trial starts only while finished + running trials
leave room, so N workers never overshoot; a WAITING trial (a retry, an enqueued config) is taken
while the finished ones alone leave room.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from search.storage._tables import state_counts

BUDGET_ATTR = "hpsearch_budget_trials"  # the global trial budget, updatable by `run --trials`


@dataclass(frozen=True)
class Counts:
    """Trials by state. The budget counts COMPLETE + PRUNED across every worker."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


class BudgetReached(Exception):
    """No room for a new trial: the budget is met, or the trials running elsewhere meet it."""

    def __init__(self, counts: Counts) -> None:
        super().__init__(f"budget reached: {counts}")
        self.counts = counts


def counts_of(states: dict[Any, int]) -> Counts:
    """Counts from trials by TrialState (missing states: none)."""
    return Counts(
        complete=states.get(TrialState.COMPLETE, 0),
        pruned=states.get(TrialState.PRUNED, 0),
        failed=states.get(TrialState.FAIL, 0),
        running=states.get(TrialState.RUNNING, 0),
        waiting=states.get(TrialState.WAITING, 0),
    )


def count_trials(study: optuna.Study) -> Counts:
    """The study's trials counted by state, in one GROUP BY query."""
    return counts_of(state_counts(study))


def admit(budget: int, counts: Counts, *, taking_waiting: bool = False) -> None:
    """Raise BudgetReached unless a trial may start: a new one while finished + running trials
    stay below the budget, a WAITING one (`taking_waiting`) while the finished ones do."""
    taken = counts.finished if taking_waiting else counts.finished + counts.running
    if taken >= budget:
        raise BudgetReached(counts)


def budget_of(study: optuna.Study, trials: int) -> int:
    """The study's global trial budget: the stored one, else `trials` (the spec's)."""
    return int(study.user_attrs.get(BUDGET_ATTR, trials))
