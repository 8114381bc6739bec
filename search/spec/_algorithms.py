"""Samplers and pruners: one registry each, name → Optuna class and the arguments hpsearch sets.

The arguments come from the few study settings they need (`Settings`), not the study spec, so
the spec's schema can check sampler and pruner names and options against these registries.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from search._errors import SpecError


@dataclass(frozen=True)
class Settings:
    """What a factory may read of the study: its seed, its epoch budget and (grid) its grid."""

    seed: int | None = None
    epochs: int = 1
    grid: Callable[[], dict[str, list[Any]]] = dict


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    optuna_class: str  # in optuna.samplers / optuna.pruners: its arguments are the options
    # The arguments hpsearch passes; a study's options override them (seed and grid excepted:
    # the schema reserves those).
    defaults: Callable[[Settings], dict[str, Any]]


def _seeded(s: Settings) -> dict[str, Any]:
    return {"seed": s.seed}


def _table(*infos: AlgorithmInfo) -> dict[str, AlgorithmInfo]:
    return {info.name: info for info in infos}


# Optuna 5's TPE defaults stand: multivariate for single-objective studies, constant liar on,
# so parallel workers do not all sample next to the same running trial.
SAMPLERS = _table(
    AlgorithmInfo("tpe", "TPESampler", _seeded),
    AlgorithmInfo("random", "RandomSampler", _seeded),
    AlgorithmInfo("cmaes", "CmaEsSampler", _seeded),
    AlgorithmInfo("gp", "GPSampler", _seeded),
    AlgorithmInfo("qmc", "QMCSampler", _seeded),
    # The space check has made sure every entry is discrete.
    AlgorithmInfo("grid", "GridSampler", lambda s: {"search_space": s.grid(), "seed": s.seed}),
    AlgorithmInfo("nsga2", "NSGAIISampler", _seeded),
)
# Resources are epochs: Hyperband's bracket tops out at the study's epoch budget.
PRUNERS = _table(
    AlgorithmInfo("hyperband", "HyperbandPruner",
                  lambda s: {"min_resource": 1, "max_resource": s.epochs, "reduction_factor": 3}),
    AlgorithmInfo("asha", "SuccessiveHalvingPruner",
                  lambda s: {"min_resource": 1, "reduction_factor": 3}),
    AlgorithmInfo("median", "MedianPruner",
                  lambda s: {"n_startup_trials": 5, "n_warmup_steps": 1}),
    AlgorithmInfo("percentile", "PercentilePruner",
                  lambda s: {"percentile": 25.0, "n_startup_trials": 5, "n_warmup_steps": 1}),
    AlgorithmInfo("none", "NopPruner", lambda s: {}),
)


def build(kind: str, name: str, options: dict[str, Any], settings: Settings) -> Any:
    """The `kind` ("sampler" or "pruner") named `name`; rejected options are a SpecError."""
    table, module = ((SAMPLERS, optuna.samplers) if kind == "sampler"
                     else (PRUNERS, optuna.pruners))
    if name not in table:
        raise SpecError(f"{kind}.type: expected one of {', '.join(table)}, got {name!r}")
    info = table[name]
    try:
        with warnings.catch_warnings():  # QMC is experimental in Optuna: ours to know
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return getattr(module, info.optuna_class)(**{**info.defaults(settings), **options})
    except TypeError as e:
        raise SpecError(f"{kind}.options: {name} does not accept these options ({e})") from e
    except ValueError as e:
        raise SpecError(f"{kind}.options: {e}") from e
