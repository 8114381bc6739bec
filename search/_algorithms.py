"""Samplers and pruners: one registry each, built from the study file's `sampler:`/`pruner:`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search._errors import SpecError

if TYPE_CHECKING:
    import optuna

    from search._spec import StudySpec


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    factory: Callable[..., Any]  # (spec, **options) -> sampler or pruner
    optuna_class: str  # in optuna.samplers / optuna.pruners: its arguments are the options
    description: str


def _tpe(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import optuna

    # Optuna 5's defaults: multivariate for single-objective studies, constant liar on, so
    # parallel workers do not all sample next to the same running trial.
    return optuna.samplers.TPESampler(seed=spec.sampler.seed, **options)


def _random(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=spec.sampler.seed, **options)


def _cmaes(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=spec.sampler.seed, **options)


def _gp(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.GPSampler(seed=spec.sampler.seed, **options)


def _qmc(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=spec.sampler.seed, **options)


def _grid(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from search._space import distributions

    grid: dict[str, list[Any]] = {}
    for name, dist in distributions(spec).items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, IntDistribution):
            grid[name] = list(range(dist.low, dist.high + 1))
        else:
            raise SpecError(
                f"space.{name}: the grid sampler needs discrete entries (choices, grid, pow2 or "
                f"an int range), got a float range"
            )
    return optuna.samplers.GridSampler(grid, seed=spec.sampler.seed, **options)


def _nsga2(spec: StudySpec, **options: Any) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=spec.sampler.seed, **options)


SAMPLERS: dict[str, AlgorithmInfo] = {
    info.name: info
    for info in (
        AlgorithmInfo("tpe", _tpe, "TPESampler", "Tree-structured Parzen Estimator (multivariate)"),
        AlgorithmInfo("random", _random, "RandomSampler", "uniform random search"),
        AlgorithmInfo("cmaes", _cmaes, "CmaEsSampler", "CMA-ES (continuous spaces)"),
        AlgorithmInfo("gp", _gp, "GPSampler", "Gaussian-process Bayesian optimization"),
        AlgorithmInfo("qmc", _qmc, "QMCSampler", "quasi-Monte Carlo (Sobol) sequence"),
        AlgorithmInfo("grid", _grid, "GridSampler", "exhaustive grid over an all-discrete space"),
        AlgorithmInfo("nsga2", _nsga2, "NSGAIISampler", "NSGA-II (multi-objective)"),
    )
}


def _hyperband(spec: StudySpec, **options: Any) -> optuna.pruners.BasePruner:
    import optuna

    # Resources are epochs: the bracket tops out at the study's epoch budget.
    options = {"min_resource": 1, "max_resource": spec.budget.epochs, "reduction_factor": 3,
               **options}
    return optuna.pruners.HyperbandPruner(**options)


def _asha(spec: StudySpec, **options: Any) -> optuna.pruners.BasePruner:
    import optuna

    options = {"min_resource": 1, "reduction_factor": 3, **options}
    return optuna.pruners.SuccessiveHalvingPruner(**options)


def _median(spec: StudySpec, **options: Any) -> optuna.pruners.BasePruner:
    import optuna

    options = {"n_startup_trials": 5, "n_warmup_steps": 1, **options}
    return optuna.pruners.MedianPruner(**options)


def _percentile(spec: StudySpec, **options: Any) -> optuna.pruners.BasePruner:
    import optuna

    options = {"percentile": 25.0, "n_startup_trials": 5, "n_warmup_steps": 1, **options}
    return optuna.pruners.PercentilePruner(**options)


def _none(spec: StudySpec, **options: Any) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner(**options)


PRUNERS: dict[str, AlgorithmInfo] = {
    info.name: info
    for info in (
        AlgorithmInfo("hyperband", _hyperband, "HyperbandPruner", "Hyperband over epochs"),
        AlgorithmInfo("asha", _asha, "SuccessiveHalvingPruner", "asynchronous successive halving"),
        AlgorithmInfo("median", _median, "MedianPruner", "stop below the median of earlier trials"),
        AlgorithmInfo("percentile", _percentile, "PercentilePruner", "stop below a percentile"),
        AlgorithmInfo("none", _none, "NopPruner", "never prune"),
    )
}


def _build(kind: str, table: dict[str, AlgorithmInfo], name: str, spec: StudySpec,
           options: dict[str, Any]) -> Any:
    if name not in table:
        raise SpecError(f"{kind}.type: expected one of {', '.join(table)}, got {name!r}")
    info = table[name]
    try:
        return info.factory(spec, **options)
    except TypeError as e:
        raise SpecError(f"{kind}.options: {name} does not accept these options ({e})") from e
    except ValueError as e:
        raise SpecError(f"{kind}.options: {e}") from e


def build_sampler(spec: StudySpec, *, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler; options the sampler rejects are a SpecError naming them.

    `salt` shifts the seed: parallel workers, and a resumed study, must not replay the same
    random draws as the first worker of the first run.
    """
    if salt and spec.sampler.seed is not None:
        spec = spec.model_copy(update={
            "sampler": spec.sampler.model_copy(update={"seed": spec.sampler.seed + salt})})
    return _build("sampler", SAMPLERS, spec.sampler.type, spec, dict(spec.sampler.options))


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner; options the pruner rejects are a SpecError naming them."""
    return _build("pruner", PRUNERS, spec.pruner.type, spec, dict(spec.pruner.options))


def check_options(spec: StudySpec) -> None:
    """Fail at load time, not at the first trial: build both once and discard them."""
    build_sampler(spec)
    build_pruner(spec)
