"""The study file's `constraints:`: bounds on reported metrics, the values a trial is told with,
and which trials meet them.

``constraints: [{metric: params_m, max: 5}, {metric: val_accuracy, min: 0.8}]`` bounds the last
value a trial reported (or returned) of each metric. Every finished trial gets one value per
bound in Optuna's convention (`constraint_values`: above 0 violates it), written with its result
as Optuna's `Trial.set_constraint` writes them, so TPE, NSGA-II and GP read them as they sample,
and `Study.best_trial` and `best_trials` keep to the feasible trials (`best_trials` here, for the
views). Optuna 5 deprecates the samplers' `constraints_func`, and it runs before hpsearch writes
a trial's history: the values are written by the trial instead.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState
from pydantic import model_validator

from search._errors import SpecError
from search.spec._algorithms import algorithm_class, is_path
from search.spec._model import Metric, Number, SpecModel, did_you_mean, show, spec_error

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# Samplers that read the trials' constraint values as they sample; a class by import path does
# if its __init__ takes `constraints_func` (Optuna's mark of a constraint-aware sampler).
CONSTRAINED_SAMPLERS = ("tpe", "nsga2", "gp")
# The built-in trainer's numeric metrics: its history fields (`search.trial._history`) and the
# model's parameter count (the `parameters` attr).
BUILT_IN_METRICS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy",
                    "epoch_seconds", "train_seconds", "samples_per_second", "lr", "momentum",
                    "trained_parameters", "parameters")
# The violation of a bound whose metric the trial never reported (or reported as NaN/inf):
# infeasible, and worse than any measured violation. Finite: Optuna forbids NaN, and GP fits a
# model to the values.
MISSING = 1.0e12
# Where a trial's attrs keep a metric besides its history: what a function returned, and
# the built-in trainer's parameter count.
RETURNED_ATTR = "returned"
_ATTR_METRICS = ("parameters",)


class Constraint(SpecModel):
    """One ``{metric, max}`` or ``{metric, min}`` (or both: a range) on a reported metric."""

    metric: Metric
    max: Number | None = None
    min: Number | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> Constraint:
        if self.max is None and self.min is None:
            raise spec_error(f"expected max: or min: (or both) to bound {self.metric}, "
                             "got neither")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise spec_error(f"expected min <= max, got min: {show(self.min)}, "
                             f"max: {show(self.max)}", key="min")
        return self

    def bounds(self) -> Iterator[tuple[str, float, float]]:
        """(label, bound, sign) of each bound: the violation is sign * (value - bound)."""
        if self.min is not None:
            yield f"{self.metric} >= {self.min:g}", float(self.min), -1.0
        if self.max is not None:
            yield f"{self.metric} <= {self.max:g}", float(self.max), 1.0


def takes_constraints(sampler: str) -> bool:
    """Whether the sampler named `sampler` (a built-in or an import path) uses constraints."""
    if sampler in CONSTRAINED_SAMPLERS:
        return True
    if not is_path(sampler):
        return False
    try:
        cls = algorithm_class("sampler", sampler)
    except SpecError:
        return False  # sampler.type says why
    return "constraints_func" in inspect.signature(cls.__init__).parameters


def check_constraints(constraints: list[Constraint], sampler: str, built_in: bool) -> None:
    """Raise a spec error (at `constraints`) for a sampler that ignores constraints, a bound
    given twice, or a metric the built-in trainer does not report."""
    if not constraints:
        return
    if not takes_constraints(sampler):
        raise spec_error(f"sampler {sampler!r} ignores constraints; the samplers that use them "
                         f"are {', '.join(CONSTRAINED_SAMPLERS)} (or a sampler class whose "
                         "__init__ takes constraints_func)", key="constraints")
    seen: set[str] = set()
    for i, constraint in enumerate(constraints):
        metric = constraint.metric
        if built_in and metric not in BUILT_IN_METRICS:
            raise spec_error(f"expected a metric of the built-in trainer, one of: "
                             f"{', '.join(BUILT_IN_METRICS)}; got {show(metric)}"
                             f"{did_you_mean(metric, list(BUILT_IN_METRICS))} (or any metric "
                             "your own trainer: reports)", key=f"constraints[{i}].metric")
        for label, _, _ in constraint.bounds():
            if label in seen:
                raise spec_error(f"{label} is given twice", key=f"constraints[{i}]")
            seen.add(label)


def metric_value(metric: str, attrs: Mapping[str, Any]) -> float | None:
    """A trial's value of `metric` from its user attrs: what its function returned, else its
    last report of it, else (`parameters`) its attr; None if missing, NaN or infinite."""
    returned = attrs.get(RETURNED_ATTR) or {}
    if metric in returned:
        value = returned[metric]
    else:
        history = attrs.get("history") or []
        value = next((r[metric] for r in reversed(history) if metric in r), None)
        if value is None and metric in _ATTR_METRICS:
            value = attrs.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        return None
    return float(value)


def constraint_values(constraints: list[Constraint], attrs: Mapping[str, Any]
                      ) -> dict[str, float]:
    """label → violation of every bound (Optuna's convention: <= 0 meets it), from a trial's
    user attrs (`metric_value`); a missing metric violates its bounds by MISSING."""
    out = {}
    for constraint in constraints:
        value = metric_value(constraint.metric, attrs)
        for label, bound, sign in constraint.bounds():
            out[label] = MISSING if value is None else sign * (value - bound)
    return out


def labels(constraints: list[Constraint]) -> list[str]:
    """Every bound's label, in order: ``["params_m <= 5", "val_accuracy >= 0.8"]``."""
    return [label for c in constraints for label, _, _ in c.bounds()]


def measured(constraints: list[Constraint], attrs: Mapping[str, Any]
             ) -> dict[str, float | None]:
    """label → the trial's value of the bounded metric (None: missing), as the views show
    each bound: ``{"params_m <= 5": 3.2}``."""
    return {label: metric_value(c.metric, attrs) for c in constraints
            for label, _, _ in c.bounds()}


def is_feasible(trial: FrozenTrial) -> bool:
    """Optuna's rule: every constraint value of the trial is 0 or less (none: feasible)."""
    return all(v <= 0.0 for v in trial.constraints.values())


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible COMPLETE trial (one objective) or the feasible Pareto front (several);
    [] when no complete trial is feasible (or none completed), where `Study.best_trial` raises.
    Without constraints, every trial is feasible: Optuna's best trial(s)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [t for t in complete if is_feasible(t)]
    if not feasible:
        return []
    # Optuna's own picks keep to the feasible trials, once a trial's constraints are stored.
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]
