"""The study file: its schema, validation against the trainer, the search space and its mapping
onto Optuna's distributions, and the samplers and pruners it names.

`load_spec` reads and checks a file (every problem one SpecError naming the key); a `StudySpec`
then gives each trial its parameters (`suggest`), its trainer config (`train_config_for`) and
the study its sampler and pruner; `constraints:` bound reported metrics, and a trial meets
them or not (`is_feasible`, `best_trials`). Nothing here touches a storage.
"""

from __future__ import annotations

from search.spec._algorithms import PRUNERS, SAMPLERS
from search.spec._constraints import (
    BUILT_IN_METRICS,
    RETURNED_ATTR,
    Constraint,
    best_trials,
    constraint_values,
    is_feasible,
    labels,
    measured,
    metric_value,
)
from search.spec._entries import AutoEntry, ChoicesEntry, Entry, GridEntry, Pow2Entry, RangeEntry
from search.spec._knobs import canonical, constant_values, constants_of
from search.spec._model import same, show
from search.spec._schema import METRICS, PACK_MAX, Resources, StudySpec
from search.spec._space import (
    auto_lr_key,
    distributions,
    enqueue_params,
    grid_search_space,
    lr_key,
    params_from_optuna,
    real_value_attrs,
    suggest,
)
from search.spec._study_file import (
    SPEC_VERSION,
    base_train_config,
    build_pruner,
    build_sampler,
    check_trainer,
    describe,
    drawn_configs,
    load_spec,
    pack_outlook,
    parse_spec,
    sampler_outlook,
    spec_from_json,
    spec_to_json,
    train_config_for,
)
from search.spec._tracking import MlflowSpec, TrackingSpec, WandbSpec

__all__ = [
    "BUILT_IN_METRICS",
    "METRICS",
    "PACK_MAX",
    "PRUNERS",
    "RETURNED_ATTR",
    "SAMPLERS",
    "SPEC_VERSION",
    "AutoEntry",
    "ChoicesEntry",
    "Constraint",
    "Entry",
    "GridEntry",
    "Pow2Entry",
    "RangeEntry",
    "Resources",
    "StudySpec",
    "MlflowSpec",
    "TrackingSpec",
    "WandbSpec",
    "auto_lr_key",
    "base_train_config",
    "best_trials",
    "build_pruner",
    "build_sampler",
    "canonical",
    "check_trainer",
    "constant_values",
    "constraint_values",
    "constants_of",
    "describe",
    "distributions",
    "drawn_configs",
    "enqueue_params",
    "grid_search_space",
    "is_feasible",
    "labels",
    "load_spec",
    "pack_outlook",
    "sampler_outlook",
    "lr_key",
    "measured",
    "metric_value",
    "params_from_optuna",
    "parse_spec",
    "real_value_attrs",
    "same",
    "show",
    "spec_from_json",
    "spec_to_json",
    "suggest",
    "train_config_for",
]
