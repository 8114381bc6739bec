"""The search space: checked against the trainer, sampled with Optuna, mapped both ways.

A space key is a trainer knob (``lr``, ``batch_size``, ``schedule.gamma``); its Optuna parameter
has the same name, except ``{pow2: …}`` entries, searched as ``log2_<key>``. Conditions
(``when``) live here and nowhere else: a conditional parameter is sampled after the parameters
it names, and only when each of them holds one of the listed values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search._errors import SpecError
from search.spec._entries import AutoEntry, ChoicesEntry, Entry, GridEntry, Pow2Entry, RangeEntry
from search.spec._knobs import (
    canonical,
    check_knob,
    constants_of,
    hint,
    numeric_kind,
    plugins_of,
    trainer_error,
)
from search.spec._model import did_you_mean, fail, same, show
from search.spec._schema import StudySpec
from trainers import ConfigError, TrainConfig, config_from_dict, is_plugin_argument


def check_space(spec: StudySpec, base: TrainConfig, constants: dict[str, tuple[str, Any]]) -> None:
    """Validate the space against the trainer and itself; make integer ranges explicit.

    ``constants`` maps trainer paths of data/model/fixed settings to (study path, value).
    """
    seen: dict[str, str] = {}
    plugins = plugins_of(spec)
    for key in list(spec.space):
        path = f"space.{key}"
        check_knob(path, key, plugins)
        where = canonical(key)
        if where in seen:
            raise fail(path, f"the same setting as space.{seen[where]}; keep one")
        seen[where] = key
        if where in constants:
            raise fail(constants[where][0], f"also searched as {path}; a setting is either "
                                            "searched (space) or held constant, not both")
        spec.space[key] = entry = _with_trainer_types(path, key, spec.space[key], plugins)
        _check_lr_forms(path, where, entry, constants)
        for sub, value in _candidates(entry):
            try:
                config_from_dict({key: value}, base=base)
            except ConfigError as e:
                raise trainer_error(f"{path}.{sub}", key, e) from e
        if spec.sampler.type == "grid" and not entry.discrete():
            raise fail(path, "the grid sampler needs discrete parameters (choices, grid, pow2 "
                             "or an int range), got "
                             f"{show(entry.model_dump(exclude_none=True))}")
    _check_conditions(spec, constants)
    order(spec)  # raises on a cycle of conditions

def check_user_space(spec: StudySpec) -> None:
    """The space of a study with its own trainer: any knob names, each range a float unless it
    says `int`; conditions as for the built-in trainer. What the values mean is the user's."""
    constants = constants_of(spec)
    for key, entry in spec.space.items():
        path = f"space.{key}"
        if isinstance(entry, AutoEntry):
            raise fail(f"{path}.auto", "the LR range test runs the built-in trainer; with your "
                                       "own trainer give the lr a range")
        if getattr(entry, "per_batch", None) is not None:
            raise fail(f"{path}.per_batch", "linear lr scaling is the built-in trainer's; "
                                            "scale the lr in your own code")
        if canonical(key) in constants:
            raise fail(constants[canonical(key)][0], f"also searched as {path}; a setting is "
                                                     "either searched (space) or held constant")
        if isinstance(entry, RangeEntry) and entry.is_int:
            spec.space[key] = entry.as_int()
        if spec.sampler.type == "grid" and not entry.discrete():
            raise fail(path, "the grid sampler needs discrete parameters (choices, grid, pow2 "
                             "or an int range), got "
                             f"{show(entry.model_dump(exclude_none=True))}")
    _check_conditions(spec, constants)
    order(spec)


def _with_trainer_types(path: str, key: str, entry: Entry, plugins: set[str]) -> Entry:
    if not isinstance(entry, RangeEntry):
        return entry
    kind = numeric_kind(key, plugins)
    if entry.is_int and is_plugin_argument(canonical(key), plugins):
        kind = int  # a plugin's argument is what its range says
    if kind is None:
        raise fail(path, f"a range needs a numeric setting, and {key} is "
                         f"{_describe(hint(key))}; use choices")
    if kind is int:
        if entry.is_int is False:
            raise fail(f"{path}.int", f"{key} is an integer setting, got false")
        for sub in ("low", "high", "step"):
            value = getattr(entry, sub)
            if value is not None and float(value) != int(value):
                raise fail(f"{path}.{sub}", f"expected an integer ({key} is one), "
                                            f"got {show(value)}")
        return entry.as_int()
    return entry

def _check_lr_forms(path: str, where: str, entry: Entry,
                    constants: dict[str, tuple[str, Any]]) -> None:
    """`auto` and `per_batch` belong to the lr alone."""
    if isinstance(entry, AutoEntry) and where != "optimizer.lr":
        raise fail(f"{path}.auto", "only lr can be found by the LR range test; give a range")
    per_batch = getattr(entry, "per_batch", None)
    if per_batch is None:
        return
    if where != "optimizer.lr":
        raise fail(f"{path}.per_batch", f"only lr scales with the batch size, got "
                                        f"per_batch on {path.removeprefix('space.')}")
    if "optimizer.lr_per_batch" in constants:
        raise fail(f"{path}.per_batch", f"also set by {constants['optimizer.lr_per_batch'][0]}; "
                                        "keep one")

def _describe(kind: Any) -> str:
    text = str(kind).replace("typing.", "")
    if "tuple" in text:
        return "a list setting"
    return {"str": "a string setting", "bool": "a true/false setting"}.get(
        getattr(kind, "__name__", ""), text)

def _candidates(entry: Entry) -> list[tuple[str, Any]]:
    """(sub-path, trainer value) pairs that bound what the entry can produce."""
    if isinstance(entry, RangeEntry):
        return [("low", entry.low), ("high", entry.high)]
    if isinstance(entry, ChoicesEntry):
        return [(f"choices[{i}]", v) for i, v in enumerate(entry.choices)]
    if isinstance(entry, GridEntry):
        return [(f"grid[{i}]", v) for i, v in enumerate(entry.grid_values)]
    if isinstance(entry, AutoEntry):
        return []  # no range yet: the LR range test's is checked when it is stored
    assert isinstance(entry, Pow2Entry)
    return [(f"pow2[{i}]", v) for i, v in enumerate(entry.pow2)]

def _conditions(entry: Entry) -> dict[str, list[Any]]:
    """The entry's ``when`` with every value turned into a list of accepted values."""
    return {
        param: list(values) if isinstance(values, list) else [values]
        for param, values in (entry.when or {}).items()
    }

def _check_conditions(spec: StudySpec, constants: dict[str, tuple[str, Any]]) -> None:
    by_path = {canonical(k): k for k in spec.space}
    for key, entry in spec.space.items():
        for param, values in _conditions(entry).items():
            path = f"space.{key}.when.{param}"
            if not values:
                raise fail(path, "expected a value or a list of values, got []")
            target = canonical(param)
            if target in by_path:
                other = spec.space[by_path[target]]
                if not other.discrete():
                    raise fail(path, f"a condition needs a discrete parameter (choices, grid, "
                                     f"pow2 or an int range), and space.{param} is a float range")
                listed = isinstance((entry.when or {})[param], list)
                for i, value in enumerate(values):
                    expected = other.check_value(value)
                    if expected is not None:
                        raise fail(f"{path}[{i}]" if listed else path,
                                   f"expected {expected} (space.{by_path[target]}), "
                                   f"got {show(value)}")
            elif target in constants:
                where, fixed = constants[target]
                if not any(same(fixed, v) for v in values):
                    raise fail(path, f"never true: {where} is {show(fixed)}, got {show(values)}")
            else:
                names = list(spec.space) + [p.split(".", 1)[-1] for p, _ in constants.values()]
                raise fail(path, f"unknown parameter{did_you_mean(param, names)} (a condition "
                                 f"names a key of space or fixed), got {param!r}")

def order(spec: StudySpec) -> list[str]:
    """Space keys in sampling order: every parameter after those its `when` names."""
    by_path = {canonical(k): k for k in spec.space}
    deps = {
        key: [by_path[canonical(p)] for p in _conditions(e) if canonical(p) in by_path]
        for key, e in spec.space.items()
    }
    done: list[str] = []
    visiting: list[str] = []

    def visit(key: str) -> None:
        if key in done:
            return
        if key in visiting:
            cycle = " → ".join(visiting[visiting.index(key):] + [key])
            raise fail(f"space.{key}.when", f"expected conditions without a cycle, got {cycle}")
        visiting.append(key)
        for dep in deps[key]:
            visit(dep)
        visiting.pop()
        done.append(key)

    for key in spec.space:
        visit(key)
    return done

def _active(entry: Entry, values: dict[str, Any]) -> bool:
    return all(
        canonical(p) in values and any(same(values[canonical(p)], v) for v in accepted)
        for p, accepted in _conditions(entry).items()
    )

def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """Every parameter that can ever be sampled, by Optuna parameter name, in space order.

    An lr still `{auto: true}` has none yet: a SpecError says so.
    """
    return {entry.optuna_name(key): entry.distribution() for key, entry in spec.space.items()}

def auto_lr_key(spec: StudySpec) -> str | None:
    """The space key of an lr left to the LR range test (`{auto: true}`), if any."""
    return next((k for k, e in spec.space.items() if isinstance(e, AutoEntry)), None)

def lr_key(spec: StudySpec) -> str | None:
    """The space key of the searched lr (``lr`` or ``optimizer.lr``), if the lr is searched."""
    return next((k for k in spec.space if canonical(k) == "optimizer.lr"), None)

def grid_search_space(spec: StudySpec) -> dict[str, list[Any]]:
    """Optuna parameter name → every value, for ``optuna.samplers.GridSampler``."""
    return {entry.optuna_name(key): entry.grid() for key, entry in spec.space.items()}

def _suggest_one(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, CategoricalDistribution)
    return trial.suggest_categorical(name, dist.choices)

def suggest(trial: optuna.Trial, spec: StudySpec, *,
            user_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample the trial's parameters; return them as flat trainer settings with real values.

    Conditions are resolved in dependency order; a pow2 parameter also sets the trial's user
    attribute ``<key>`` to the real value, so the dashboard shows ``batch_size: 128``. Given
    `user_attrs`, those attributes are added to it for the caller to write in one batch.
    """
    values = {path: value for path, (_, value) in constants_of(spec).items()}
    sampled: dict[str, Any] = {}
    for key in order(spec):
        entry = spec.space[key]
        if not _active(entry, values):
            continue
        name = entry.optuna_name(key)
        real = entry.to_real(_suggest_one(trial, name, entry.distribution()))
        if name != key and user_attrs is not None:
            user_attrs[key] = real
        elif name != key:
            trial.set_user_attr(key, real)
        sampled[key] = values[canonical(key)] = real
    return {key: sampled[key] for key in spec.space if key in sampled}

def real_value_attrs(spec: StudySpec) -> dict[str, tuple[str, Callable[[Any], Any]]]:
    """Parameters that Optuna stores under another name (``log2_batch_size``), with the user
    attribute that shows their real value and how to compute it: what `suggest` adds."""
    return {entry.optuna_name(key): (key, entry.to_real) for key, entry in spec.space.items()
            if entry.optuna_name(key) != key}

def params_from_optuna(spec: StudySpec, optuna_params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna params → flat trainer settings (``log2_batch_size: 7`` → 128)."""
    by_name = {entry.optuna_name(key): key for key, entry in spec.space.items()}
    for name in optuna_params:
        if name not in by_name:
            raise SpecError(f"parameter {name!r} is not in study {spec.name!r}'s space "
                            f"(expected one of: {', '.join(by_name)})")
    return {
        by_name[name]: spec.space[by_name[name]].to_real(value)
        for name, value in sorted(optuna_params.items(), key=lambda kv: list(by_name).index(kv[0]))
    }

def enqueue_params(spec: StudySpec, flat: dict[str, Any], *, path: str = "enqueue") -> dict:
    """A user's config in real values (``batch_size: 128``) → Optuna params to enqueue.

    Every key must be a space key, every value one the entry can sample, and every condition
    of a given key must hold, decided by the config itself or by the fixed settings; errors name
    ``<path>.<key>``.
    """
    if not isinstance(flat, dict):
        raise fail(path, f"expected a mapping of space keys to values, got {show(flat)}")
    constants = constants_of(spec)
    values = {where: value for where, (_, value) in constants.items()}
    values.update({canonical(k): v for k, v in flat.items() if k in spec.space})
    out: dict[str, Any] = {}
    for key, value in flat.items():
        where = f"{path}.{key}"
        if key not in spec.space:
            if canonical(str(key)) in constants:
                raise fail(where, f"held constant by {constants[canonical(key)][0]}, not searched")
            raise fail(where, f"not a key of the space{did_you_mean(str(key), list(spec.space))} "
                              f"(expected one of: {', '.join(spec.space)})")
        entry = spec.space[key]
        expected = entry.check_value(value)
        if expected is not None:
            raise fail(where, f"expected {expected}, got {show(value)}")
        for param, accepted in _conditions(entry).items():
            if canonical(param) not in values:
                raise fail(where, f"depends on {param} (space.{key}.when); give {param} too")
            if not any(same(values[canonical(param)], v) for v in accepted):
                raise fail(where, f"not searched unless {param} is {show(accepted)} "
                                  f"(space.{key}.when), got {param}: "
                                  f"{show(values[canonical(param)])}")
        out[entry.optuna_name(key)] = entry.to_optuna(value)
    return out
