"""Trainer settings as a study file names them: keys checked, values checked, errors re-addressed.

The trainer's `config_from_dict` is the only judge of a setting; this module calls it and turns
its ConfigError into a SpecError naming the key path in the study file (``fixed.lr``,
``space.optimizer.choices[1]``).
"""

from __future__ import annotations

import re
import typing
from typing import Any

from search._errors import SpecError
from search.spec._model import did_you_mean, fail
from search.spec._schema import StudySpec
from trainers import CONFIG_SECTIONS as SECTIONS
from trainers import KNOB_ALIASES as ALIASES
from trainers import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    is_plugin_argument,
    knob_names,
    plugin_sections,
)

_TRAINER_KEY = re.compile(r"^([A-Za-z_][\w.]*(?:\[\d+\])*): (.*)$", re.DOTALL)


def trainer_error(path: str, key: str, error: ConfigError) -> SpecError:
    """The trainer's ConfigError about ``key``, re-addressed to ``path`` in the study file."""
    match = _TRAINER_KEY.match(str(error))
    if not match:
        return fail(path, str(error))
    where, detail = match.groups()
    if where.startswith(key) and where[len(key):].startswith("["):
        path += where[len(key):]  # an item of a list setting, e.g. hidden[1]
    return fail(path, detail)


def canonical(key: str) -> str:
    """The dotted trainer path of a flat or dotted knob: ``lr`` → ``optimizer.lr``."""
    return ALIASES.get(key, key)


def flat_settings(values: dict[str, Any], prefix: str) -> list[tuple[str, str, Any]]:
    """(study-file path, trainer path, value) for each setting; nested sections are spread."""
    out = []
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            out += [(f"{prefix}{key}.{k}", f"{key}.{k}", v) for k, v in value.items()]
        else:
            out.append((f"{prefix}{key}", canonical(key), value))
    return out


def plugins_of(spec: StudySpec) -> set[str]:
    """The sections ("model", "data") of the spec that name a user's plugin."""
    return plugin_sections(str(spec.model.get("type", "mlp")),
                           str(spec.data.get("dataset", "fashion_mnist")))


def check_knob(path: str, key: str, plugins: set[str] = frozenset()) -> None:
    """Raise unless ``key`` names a trainer setting a study may fix or search (a plugin's own
    arguments, `model.width`, included)."""
    if is_plugin_argument(canonical(key), plugins):
        return
    if key == "epochs":
        raise fail(path, "the number of epochs is budget.epochs (the pruners' resource); "
                         "set it there")
    if key not in knob_names():
        raise fail(path, f"unknown trainer setting{did_you_mean(key, knob_names())} "
                         f"(flat names: {', '.join(ALIASES)}; or dotted, such as "
                         f"optimizer.beta1 or schedule.gamma)")


def hint(key: str, plugins: set[str] = frozenset()) -> Any:
    """The type hint of a trainer setting, by flat or dotted name (Any: a plugin's argument)."""
    if is_plugin_argument(canonical(key), plugins):
        return Any
    head, _, rest = canonical(key).partition(".")
    if rest:
        return typing.get_type_hints(SECTIONS[head])[rest]
    return typing.get_type_hints(TrainConfig)[head]


def numeric_kind(key: str, plugins: set[str] = frozenset()) -> type | None:
    """int or float when the trainer setting is a (possibly optional) number, else None; a
    plugin's argument is a float unless its range says `int: true`."""
    if is_plugin_argument(canonical(key), plugins):
        return float
    kind = hint(key)
    args = [a for a in (typing.get_args(kind) or (kind,)) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def constants_of(spec: StudySpec) -> dict[str, tuple[str, Any]]:
    """Trainer path → (study path, value) of the settings data, model and fixed hold constant."""
    return {where: (path, value) for path, where, value in _settings(spec)}


def _settings(spec: StudySpec) -> list[tuple[str, str, Any]]:
    return (flat_settings({"data": spec.data}, "") + flat_settings({"model": spec.model}, "")
            + flat_settings(spec.fixed, "fixed."))


def constant_values(spec: StudySpec) -> dict[str, Any]:
    """Trainer path → value of every constant setting, budget.epochs included.

    A space lr with ``per_batch`` adds ``optimizer.lr_per_batch``: every trial scales its lr.
    """
    values = {where: value for where, (_, value) in constants_of(spec).items()}
    values["epochs"] = spec.budget.epochs
    for entry in spec.space.values():
        per_batch = getattr(entry, "per_batch", None)
        if per_batch is not None:  # the space samples lr per this many examples
            values["optimizer.lr_per_batch"] = per_batch
    return values


def check_constants(spec: StudySpec) -> dict[str, tuple[str, Any]]:
    """Check data, model and fixed against the trainer; return what `check_space` needs."""
    plugins = plugins_of(spec)
    for section in ("data", "model"):
        known = list(SECTIONS[section].__dataclass_fields__)
        for key in getattr(spec, section):
            if key not in known and section not in plugins:
                raise fail(f"{section}.{key}", f"unknown key{did_you_mean(key, known)} "
                                               f"(expected one of: {', '.join(known)})")
    settings = _settings(spec)
    seen: dict[str, str] = {}
    for path, where, _ in settings:
        if path.startswith("fixed."):
            check_knob(path, path.removeprefix("fixed."), plugins)
        if where in seen:
            raise fail(path, f"also set by {seen[where]}; keep one")
        seen[where] = path
    seen["epochs"] = "budget.epochs"
    try:
        config_from_dict(constant_values(spec))
    except ConfigError as e:
        raise _locate(e, settings, seen, spec.budget.epochs) from e
    return constants_of(spec)


def _locate(error: ConfigError, settings: list[tuple[str, str, Any]], seen: dict[str, str],
            epochs: int) -> SpecError:
    """Re-address the trainer's error to the study-file key that caused it."""
    message = str(error)
    key = message.split(": ", 1)[0].split("[", 1)[0]
    if key in seen:  # the trainer named the setting
        return trainer_error(seen[key], key, error)
    for path, where, value in settings:  # a setting that fails alone, e.g. an unknown name
        try:
            config_from_dict({where: value}, base=TrainConfig(epochs=epochs))
        except ConfigError as alone:
            if str(alone) == message:
                return trainer_error(path, where, error)
    return SpecError(message)
