"""TPE's history trimmed past a thousand finished trials: what keeps a worker's ask fast in a
study of ten thousand.

Optuna's TPE rebuilds its Parzen estimators from every finished trial at every ask: about 30 µs
a trial on this project's test machine, so ~300 ms an ask at 10,000 trials. A worker's storage
reads no finished trial twice (Optuna's cached storage re-reads only the unfinished trials and
the new ids), so TPE's own pass over the history is what is left. Past `HISTORY_LIMIT` finished
trials, TPE is shown the `KEEP_BEST` best completed trials (its "good" group is at most 25 of
them, so that group is the one the whole history gives) and the most recent finished trials up
to `HISTORY_LIMIT`, with every unfinished trial (the constant liar's). At or under the limit it
sees the very list it would without the wrapper: a study of the shipped studies' sizes (at
most 1,000 trials) samples exactly as before. Multi-objective studies are never trimmed.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.storage._compat import storage_of
from search.storage._grouped import TrialsView

HISTORY_LIMIT = 1000  # finished trials TPE sees in full: every shipped study stays under it
KEEP_BEST = 100  # past the limit, the best completed trials kept whatever their age


def trimmed(trials: list[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
    """`trials` as TPE is shown them: the list itself up to `HISTORY_LIMIT` finished trials;
    past it the `KEEP_BEST` best completed and the most recent finished ones up to the limit,
    and every unfinished trial, in their order."""
    states = [t.state for t in trials]
    finished = [i for i, state in enumerate(states) if state.is_finished()]
    if len(finished) <= HISTORY_LIMIT:
        return trials
    sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
    complete = [i for i in finished if states[i] == TrialState.COMPLETE and trials[i].values]
    keep = set(heapq.nsmallest(KEEP_BEST, complete, key=lambda i: sign * trials[i].values[0]))
    recent = [i for i in finished if i not in keep]
    keep.update(recent[len(recent) - (HISTORY_LIMIT - len(keep)):])
    return [t for i, (t, state) in enumerate(zip(trials, states, strict=True))
            if i in keep or not state.is_finished()]


class RecentStorage(TrialsView):
    """A study's storage as TPE sees it for one trial: the `trimmed` list read as the trial's
    first sample was drawn (Optuna's study also keeps its list for one trial)."""

    def __init__(self, inner: Any, kept: list[FrozenTrial]) -> None:
        super().__init__(inner)
        self.kept = kept

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self.kept if states is None else [t for t in self.kept if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


class TrimmedSampler(BaseSampler):
    """`sampler` (a TPESampler) sampling from a study view whose history is `trimmed`; its
    hooks (`before_trial`, `after_trial`) see the study itself."""

    def __init__(self, sampler: BaseSampler) -> None:
        self.sampler = sampler
        # The current trial's: (the study, what TPE is shown of it: the study or a view).
        self._view: tuple[optuna.Study, optuna.Study] | None = None

    def _seen(self, study: optuna.Study) -> optuna.Study:
        # Decided once a trial, at its first sample: up to the limit TPE is handed the study
        # itself (it reads the very trials it would without this wrapper).
        if self._view is not None and self._view[0] is study:
            return self._view[1]
        seen = study
        if len(study.directions) == 1:
            trials = study.get_trials(deepcopy=False)
            kept = trimmed(trials, study.direction)
            if kept is not trials:
                seen = optuna.Study(study_name=study.study_name,
                                    storage=RecentStorage(storage_of(study), kept),
                                    sampler=self.sampler, pruner=study.pruner)
        self._view = (study, seen)
        return seen

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(self._seen(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(self._seen(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(self._seen(study), trial, param_name,
                                               param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._view = None  # a new trial: the history is read again
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def with_trimmed_history(sampler: BaseSampler) -> BaseSampler:
    """`sampler` with its history trimmed past `HISTORY_LIMIT` finished trials if it is TPE;
    any other sampler as it is."""
    return TrimmedSampler(sampler) if type(sampler) is TPESampler else sampler
