"""Samplers and pruners: one registry each, name → Optuna class and the factory that builds it.

Factories take the few study settings they need (`Settings`), not the study spec, so the spec's
schema can check sampler and pruner names and options against these registries.
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
    factory: Callable[..., Any]  # (Settings, **options) -> sampler or pruner
    optuna_class: str  # in optuna.samplers / optuna.pruners: its arguments are the options


def _tpe(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    # Optuna 5's defaults: multivariate for single-objective studies, constant liar on, so
    # parallel workers do not all sample next to the same running trial.
    return optuna.samplers.TPESampler(seed=s.seed, **options)


def _random(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=s.seed, **options)


def _cmaes(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=s.seed, **options)


def _gp(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=s.seed, **options)


def _qmc(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=s.seed, **options)


def _grid(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    # The space check has made sure every entry is discrete.
    return optuna.samplers.GridSampler(s.grid(), seed=s.seed, **options)


def _nsga2(s: Settings, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=s.seed, **options)


def _registry(*infos: AlgorithmInfo) -> dict[str, AlgorithmInfo]:
    return {info.name: info for info in infos}


SAMPLERS = _registry(
    AlgorithmInfo("tpe", _tpe, "TPESampler"),
    AlgorithmInfo("random", _random, "RandomSampler"),
    AlgorithmInfo("cmaes", _cmaes, "CmaEsSampler"),
    AlgorithmInfo("gp", _gp, "GPSampler"),
    AlgorithmInfo("qmc", _qmc, "QMCSampler"),
    AlgorithmInfo("grid", _grid, "GridSampler"),
    AlgorithmInfo("nsga2", _nsga2, "NSGAIISampler"),
)


def _hyperband(s: Settings, **options: Any) -> optuna.pruners.BasePruner:
    # Resources are epochs: the bracket tops out at the study's epoch budget.
    options = {"min_resource": 1, "max_resource": s.epochs, "reduction_factor": 3, **options}
    return optuna.pruners.HyperbandPruner(**options)


def _asha(s: Settings, **options: Any) -> optuna.pruners.BasePruner:
    options = {"min_resource": 1, "reduction_factor": 3, **options}
    return optuna.pruners.SuccessiveHalvingPruner(**options)


def _median(s: Settings, **options: Any) -> optuna.pruners.BasePruner:
    options = {"n_startup_trials": 5, "n_warmup_steps": 1, **options}
    return optuna.pruners.MedianPruner(**options)


def _percentile(s: Settings, **options: Any) -> optuna.pruners.BasePruner:
    options = {"percentile": 25.0, "n_startup_trials": 5, "n_warmup_steps": 1, **options}
    return optuna.pruners.PercentilePruner(**options)


def _none(s: Settings, **options: Any) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner(**options)


PRUNERS = _registry(
    AlgorithmInfo("hyperband", _hyperband, "HyperbandPruner"),
    AlgorithmInfo("asha", _asha, "SuccessiveHalvingPruner"),
    AlgorithmInfo("median", _median, "MedianPruner"),
    AlgorithmInfo("percentile", _percentile, "PercentilePruner"),
    AlgorithmInfo("none", _none, "NopPruner"),
)


def build(kind: str, name: str, options: dict[str, Any], settings: Settings) -> Any:
    """The `kind` ("sampler" or "pruner") named `name`; rejected options are a SpecError."""
    table = SAMPLERS if kind == "sampler" else PRUNERS
    if name not in table:
        raise SpecError(f"{kind}.type: expected one of {', '.join(table)}, got {name!r}")
    try:
        return table[name].factory(settings, **options)
    except TypeError as e:
        raise SpecError(f"{kind}.options: {name} does not accept these options ({e})") from e
    except ValueError as e:
        raise SpecError(f"{kind}.options: {e}") from e
