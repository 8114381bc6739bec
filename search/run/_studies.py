"""A stored study loaded whole: the Optuna study with its spec, sampler and pruner.

Storage keeps the spec as JSON (`search.storage.open_study`) and the spec package knows how to
read it and build the sampler and pruner; this is where the two meet.
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner

from search.spec import StudySpec, build_pruner, build_sampler, spec_from_json
from search.storage import GroupedPruner, open_study


def load(name: str, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, StudySpec]:
    """An existing hpsearch study and its stored spec; unknown names list the studies there."""
    study, stored = open_study(name, storage)
    spec = spec_from_json(stored)
    study.sampler = build_sampler(spec)
    study.pruner = study_pruner(spec)
    return study, spec


def study_pruner(spec: StudySpec) -> BasePruner:
    """The study's pruner (`build_pruner`), judging within `pruner.within`'s groups if set."""
    pruner = build_pruner(spec)
    if not spec.pruner.within:
        return pruner
    return GroupedPruner(pruner, [spec.space[key].optuna_name(key) for key in spec.pruner.within])
