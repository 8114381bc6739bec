"""Samplers and pruners: one registry each, name → Optuna class and the arguments hpsearch sets.

The arguments come from the few study settings they need (`Settings`), not the study spec, so
the spec's schema can check sampler and pruner names and options against these registries.
Any other sampler or pruner is named by import path (`pkg.module:Class`), imported as a
trainer by path is (`trainers.load_plugin`: from the working directory too).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

import trainers
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
    AlgorithmInfo("threshold", "ThresholdPruner", lambda s: {}),
    AlgorithmInfo("wilcoxon", "WilcoxonPruner", lambda s: {}),
    # Its `wrapped` pruner is built first and passed in (`build`'s `wrapped`).
    AlgorithmInfo("patient", "PatientPruner", lambda s: {}),
)
BASES = {"sampler": optuna.samplers.BaseSampler, "pruner": optuna.pruners.BasePruner}


def is_path(name: str) -> bool:
    """Whether a `type` names a class by import path (`pkg.module:Class`), not a built-in."""
    return ":" in name


def algorithm_class(kind: str, name: str) -> type:
    """The class `name` names: a built-in's Optuna class, or a sampler (pruner) class by import
    path. One SpecError, without the key, if the path does not lead to one."""
    table, module = ((SAMPLERS, optuna.samplers) if kind == "sampler"
                     else (PRUNERS, optuna.pruners))
    if name in table:
        return getattr(module, table[name].optuna_class)
    if not is_path(name):
        raise SpecError(f"expected one of {', '.join(table)}, got {name!r}")
    try:
        target = trainers.load_plugin(name, f"hpsearch.{kind}s", f"{kind}.type")
    except trainers.TrainerError as e:
        raise SpecError(str(e).removeprefix(f"{kind}.type: ")) from e
    base = BASES[kind]
    what = f"a subclass of optuna.{kind}s.{base.__name__}"
    if not isinstance(target, type):
        raise SpecError(f"{name}: expected {what}, got a {type(target).__name__}")
    if not issubclass(target, base):
        other = next((k for k, b in BASES.items() if issubclass(target, b)), None)
        raise SpecError(f"{name}: expected {what}, got " + (
            f"a {other} class" if other else f"the class {target.__qualname__}, not a {kind}"))
    return target


def _path_defaults(cls: type, settings: Settings) -> dict[str, Any]:
    # A sampler of the user's gets the study's seed if it takes one, as the built-ins do.
    takes_seed = "seed" in inspect.signature(cls.__init__).parameters
    return {"seed": settings.seed} if takes_seed and issubclass(cls, BASES["sampler"]) else {}


def build(kind: str, name: str, options: dict[str, Any], settings: Settings, *,
          wrapped: Any = None) -> Any:
    """The `kind` ("sampler" or "pruner") named `name` (or its import path); rejected options
    are a SpecError. `wrapped`: the pruner a `patient` pruner wraps (None: patience alone)."""
    try:
        cls = algorithm_class(kind, name)
    except SpecError as e:
        raise SpecError(f"{kind}.type: {e}") from e
    table = SAMPLERS if kind == "sampler" else PRUNERS
    args = table[name].defaults(settings) if name in table else _path_defaults(cls, settings)
    if name == "patient" and kind == "pruner":
        args["wrapped_pruner"] = wrapped
    try:
        with warnings.catch_warnings():  # QMC is experimental in Optuna: ours to know
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**{**args, **options})
    except TypeError as e:
        raise SpecError(f"{kind}.options: {name} does not accept these options ({e})") from e
    except ValueError as e:
        raise SpecError(f"{kind}.options: {e}") from e
    except Exception as e:
        if not is_path(name):
            raise
        # A class of someone else's failed on construction: say which and why, at load.
        raise SpecError(f"{kind}.type: {name} raised {type(e).__name__}: {e}") from e


def build_pruner_of(section: Any, settings: Settings) -> Any:
    """The pruner a `pruner:` section (`type`, `options`, `wrapped`) describes, the pruner it
    wraps built first; `wrapped: {type: none}` is patience alone."""
    inner = section.wrapped
    wrapped = None if inner is None or inner.type == "none" else build_pruner_of(inner, settings)
    return build("pruner", section.type, dict(section.options), settings, wrapped=wrapped)
