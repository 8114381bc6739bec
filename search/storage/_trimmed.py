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
A worker's sampler carries the trimmed history from ask to ask (`History`): it looks only at the
trials new since its last ask, so a later ask costs the same at 10,000 trials as at 1,000.
"""

from __future__ import annotations

import bisect
import copy
import heapq
from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.storage._compat import storage_of, study_id_of
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


class History:
    """`trimmed`, kept up to date as one study's list grows: what a worker's sampler is shown
    at each ask, at a cost that grows with the kept trials and the new ones, not the study's.

    A worker reads its study's list again at every ask, in number order (trial `i` at index
    `i`); its finished trials never change. So the finished trials' numbers, the best
    `KEEP_BEST` completed (a heap) and the unfinished ones are carried from one list to the
    next, and only the trials new since the last list, or unfinished in it, are looked at.
    The list given is equal to `trimmed`'s, trial for trial (a test compares them); a list
    shorter than the last, or whose new trials, first or last are not at their numbers' places,
    is trimmed whole and starts afresh."""

    def __init__(self, direction: StudyDirection) -> None:
        self.sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
        self._reset()

    def _reset(self) -> None:
        self.looked = 0  # trials[:looked] are known
        self.unfinished: list[int] = []  # of those, the numbers of the unfinished ones
        self.finished: list[int] = []  # and of the finished ones, in order
        # The best completed: the KEEP_BEST least (sign x value, number), as a max-heap.
        self.best: list[tuple[float, int]] = []

    def _add(self, trial: FrozenTrial, i: int) -> None:
        if not trial.state.is_finished():
            self.unfinished.append(i)
            return
        bisect.insort(self.finished, i)
        if trial.state == TrialState.COMPLETE and trial.values:
            item = (-self.sign * trial.values[0], -i)
            if len(self.best) < KEEP_BEST:
                heapq.heappush(self.best, item)
            elif item > self.best[0]:
                heapq.heapreplace(self.best, item)

    def kept(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """`trimmed(trials, direction)`, from what the earlier lists left."""
        n = len(trials)
        waiting, self.unfinished = self.unfinished, []
        new = [*waiting, *range(self.looked, n)]
        if n < self.looked or any(trials[i].number != i for i in {0, self.looked - 1, n - 1, *new}
                                  if 0 <= i < n):  # not the list it grew from: trimmed whole
            self._reset()
            return trimmed(trials, StudyDirection.MINIMIZE if self.sign > 0
                           else StudyDirection.MAXIMIZE)
        for i in new:
            self._add(trials[i], i)
        self.looked = n
        if len(self.finished) <= HISTORY_LIMIT:
            return trials
        keep = {-i for _, i in self.best}
        room = HISTORY_LIMIT - len(keep)
        for i in reversed(self.finished):
            if room == 0:
                break
            if i not in keep:
                keep.add(i)
                room -= 1
        keep.update(self.unfinished)
        return [trials[i] for i in sorted(keep)]


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
        # The study's trimmed history, carried from ask to ask: (its storage, its id, History).
        self._history: tuple[Any, int, History] | None = None

    def _history_of(self, study: optuna.Study) -> History:
        storage, study_id = storage_of(study), study_id_of(study)
        if (self._history is None or self._history[0] is not storage
                or self._history[1] != study_id):
            self._history = (storage, study_id, History(study.direction))
        return self._history[2]

    def _seen(self, study: optuna.Study) -> optuna.Study:
        # Decided once a trial, at its first sample: up to the limit TPE is handed the study
        # itself (it reads the very trials it would without this wrapper).
        if self._view is not None and self._view[0] is study:
            return self._view[1]
        seen = study
        if len(study.directions) == 1:
            trials = study.get_trials(deepcopy=False)
            kept = self._history_of(study).kept(trials)
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
