"""A study whose trial list is handed out without copies, for readers that change no trial.

Optuna's plot functions read `study.trials`, a deep copy of every trial, several times a plot
(parameter importances once a parameter): at 10,000 trials that copying was most of `hpsearch
report`'s time. The report hands them `shared_study(study)`: the same storage and the same
cached trials, each list returned as it is.
"""

from __future__ import annotations

from collections.abc import Container

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.storage._compat import storage_of
from search.storage._grouped import TrialsView


class SharedStorage(TrialsView):
    """`inner` whose trial lists are never copied (`deepcopy` is ignored)."""

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self.inner.get_all_trials(study_id, deepcopy=False, states=states)


def shared_study(study: optuna.Study) -> optuna.Study:
    """`study` for a reader that changes no trial (a plot): its trials are not copied."""
    return optuna.Study(study_name=study.study_name, storage=SharedStorage(storage_of(study)),
                        sampler=study.sampler, pruner=study.pruner)
