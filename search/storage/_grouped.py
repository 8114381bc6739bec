"""Pruning within groups (`pruner.within`): a trial is judged only against the trials that share
its values of some parameters, for instance its LR schedule.

A one-cycle or warmup run climbs to its peak lr over its first epochs, so at Hyperband's early
rungs it trails a constant or cosine run that will end behind it; judged against every trial, it
is cut before it shows what it does. Within its group the pruner compares like with like.

Any Optuna pruner is wrapped unchanged: it is handed a view of the study whose storage passes
every read and write through, except that its trial list holds the group's trials alone
(`TrialsView`, which TPE's trimmed history in `_trimmed` shares).
"""

from __future__ import annotations

from abc import update_abstractmethods
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search.storage._compat import storage_of


def group_of(trial: FrozenTrial, params: Sequence[str]) -> tuple[Any, ...]:
    """The trial's values of `params` (None for one it has not sampled, as a condition skips)."""
    return tuple(trial.params.get(name) for name in params)


class TrialsView(BaseStorage):
    """`inner` with its trial list passed through `select`; every other read and write
    `inner`'s own."""

    def __init__(self, inner: BaseStorage) -> None:
        self.inner = inner

    def select(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """The trials of `inner`'s list this view shows (all of them here)."""
        return trials

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self.select(self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states))


def _forward(name: str) -> Any:
    def method(self: TrialsView, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in BaseStorage.__abstractmethods__ - {"get_all_trials"}:
    setattr(TrialsView, _name, _forward(_name))
update_abstractmethods(TrialsView)


class GroupStorage(TrialsView):
    """`inner` as one group sees it: its trial list filtered to the group, all else `inner`'s."""

    def __init__(self, inner: BaseStorage, params: Sequence[str], group: tuple[Any, ...]) -> None:
        super().__init__(inner)
        self.params = tuple(params)
        self.group = group

    def select(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        return [t for t in trials if group_of(t, self.params) == self.group]


class GroupedPruner(BasePruner):
    """`pruner`, asked about a trial with only the trials of its group in sight."""

    def __init__(self, pruner: BasePruner, params: Sequence[str]) -> None:
        self.pruner = pruner
        self.params = tuple(params)
        self._views: dict[tuple[Any, ...], optuna.Study] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.pruner.prune(self.view(study, group_of(trial, self.params)), trial)

    def view(self, study: optuna.Study, group: tuple[Any, ...]) -> optuna.Study:
        """The study as `group` sees it: one per group, kept while the study's storage is the
        same object (a worker's study lives as long as the worker)."""
        storage = storage_of(study)
        view = self._views.get(group)
        if (view is None or view.study_name != study.study_name
                or storage_of(view).inner is not storage):
            view = optuna.Study(study_name=study.study_name,
                                storage=GroupStorage(storage, self.params, group),
                                sampler=study.sampler, pruner=self.pruner)
            self._views[group] = view
        return view

