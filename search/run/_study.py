"""Creating a study from its spec, or resuming it; each worker process's own sampler seed.

A second `run` of a changed file against an existing study refuses rather than mixing two
search spaces in one study; only the budget may change between runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import optuna

from search._errors import SpecError
from search.run._studies import sign, study_pruner, study_sampler
from search.spec import (
    StudySpec,
    enqueue_params,
    spec_from_json,
    spec_to_json,
)
from search.storage import BUDGET_ATTR, LR_FIND_ATTR, SPEC_ATTR, quiet_experimental


def _comparable(spec: StudySpec, lr_find: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must match between runs of one study: all but the budget and where trials are
    logged (`tracking`), and the lr as the file asked for it when the LR range test chose the
    stored range."""
    data = spec.model_dump(mode="json")
    data.pop("budget", None)
    data.pop("tracking", None)
    if lr_find is not None and lr_find.get("key") in data["space"]:
        data["space"][lr_find["key"]] = lr_find["requested"]
    return data

def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(keys) or "settings"

def _with_tracking(stored: str, spec: StudySpec) -> str:
    """The stored spec (JSON) with the file's `tracking:`: where trials are logged may change
    between runs of a study, and workers started from then on log there."""
    data = json.loads(stored)
    tracking = spec.model_dump(mode="json")["tracking"]
    if data["spec"].get("tracking") == tracking:
        return stored
    data["spec"]["tracking"] = tracking
    return json.dumps(data)


def create_or_load(spec: StudySpec, storage: optuna.storages.BaseStorage,
                   *, trials: int | None = None, lr_find: dict[str, Any] | None = None
                   ) -> optuna.Study:
    """The study of `spec`: created (with its enqueued configs) or resumed if it exists.

    `lr_find` is the LR range test's record when it chose `spec`'s lr range: stored on a new
    study, and the file's own lr entry is what a later run is compared by.
    """
    sampler, pruner = study_sampler(spec), study_pruner(spec)
    budget = trials if trials is not None else spec.budget.trials
    if spec.name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is None:
            raise SpecError(f"study {spec.name!r} exists but was not created by hpsearch; "
                            "choose another name")
        old = _comparable(spec_from_json(stored), study.user_attrs.get(LR_FIND_ATTR))
        new = _comparable(spec, lr_find)
        if old != new:
            raise SpecError(
                f"study {spec.name!r} already exists with different settings "
                f"({_describe_difference(old, new)}); "
                "give the changed study a new name, or run the stored one with "
                f"`hpsearch worker {spec.name}`"
            )
        study.set_user_attr(BUDGET_ATTR, budget)
        updated = _with_tracking(stored, spec)
        sign(study, updated)  # the file matched: (re)signed with this process's token, if any
        if updated != stored:
            study.set_user_attr(SPEC_ATTR, updated)
        return study
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner,
            directions=spec.objective.direction_names,
        )
    except optuna.exceptions.DuplicatedStudyError:
        # Another process created it between our check and create: join it.
        return create_or_load(spec, storage, trials=trials, lr_find=lr_find)
    if lr_find is not None:  # before the spec: a study with a spec is complete to a reader
        study.set_user_attr(LR_FIND_ATTR, lr_find)
    stored = spec_to_json(spec)
    sign(study, stored)  # before the spec: a worker holding the token finds it signed
    study.set_user_attr(SPEC_ATTR, stored)
    study.set_user_attr(BUDGET_ATTR, budget)
    with quiet_experimental():
        study.set_metric_names(spec.objective.metric_names)
    for entry in spec.enqueue:
        # Warm start: run first, once (only when the study is created).
        study.enqueue_trial(enqueue_params(spec, entry), user_attrs={"enqueued": True})
    return study

def reseed(study: optuna.Study, spec: StudySpec, worker: int | None) -> None:
    """Give this process its own sampler seed: spec seed + trials so far + a worker term.

    A fresh single-worker run keeps the spec's seed (reproducible); a resumed run or a second
    worker draws new random samples instead of replaying the first ones. A worker that joined
    from elsewhere (no index) uses its process id.
    """
    if spec.sampler.seed is None:
        return
    worker_term = os.getpid() if worker is None else worker
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = study_sampler(spec, salt=existing + 7919 * worker_term)
