"""Users' own models and datasets: by import path (`pkg.module:callable`) or by the name an
installed package registers under the entry-point groups `hpsearch.models` / `hpsearch.datasets`.

A plugin's section keys that are not hpsearch's own settings are its keyword arguments (`Args`:
JSON values, immutable and hashable, so configs holding them stay frozen values). Whoever
writes a study names code that its workers import: see docs/operations.md's security notes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any, TypeVar

from trainers._errors import ConfigError
from trainers._registry import Registry, unknown_choice_message

T = TypeVar("T")

MODEL_GROUP = "hpsearch.models"
DATASET_GROUP = "hpsearch.datasets"


class Args(Mapping[str, Any]):
    """Keyword arguments for a plugin: JSON values, compared and hashed by value."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        values = dict(values or {})
        try:
            self._text = json.dumps(values, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"plugin arguments must be plain data (numbers, strings, lists, "
                              f"mappings), got {values!r}") from e
        self._values = values

    def kwargs(self) -> dict[str, Any]:
        """A fresh copy to call with: the plugin may change it without changing the config."""
        return json.loads(self._text)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(self._text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Args):
            return other._text == self._text
        return isinstance(other, Mapping) and dict(other) == self._values

    def __repr__(self) -> str:
        return f"Args({self._text})"


def is_import_path(name: str) -> bool:
    return isinstance(name, str) and ":" in name


@cache
def installed(group: str) -> dict[str, Any]:
    """Entry points of `group` by name (installed packages' plugins), read once per process."""
    return {ep.name: ep for ep in entry_points(group=group)}


def is_plugin(name: object, group: str) -> bool:
    """Whether `name` names user code: an import path, or an installed plugin's name."""
    return isinstance(name, str) and (is_import_path(name) or name in installed(group))


@cache
def _load(name: str, group: str, key: str) -> Callable[..., Any]:
    if is_import_path(name):
        module_name, _, attr = name.partition(":")
        # As `python -m` does: a user's package in the working directory imports.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - any failure to import is the user's to see
            raise ConfigError(f"{key}: {name}: cannot import {module_name!r} "
                              f"({type(e).__name__}: {e})") from e
        for part in attr.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ConfigError(f"{key}: {name}: module {module_name!r} has no attribute "
                                  f"{attr!r}") from None
    else:
        try:
            target = installed(group)[name].load()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{key}: {name}: the installed plugin ({group}) does not load "
                              f"({type(e).__name__}: {e})") from e
    if not callable(target):
        raise ConfigError(f"{key}: {name}: expected a callable, got {type(target).__name__}")
    return target


def load_plugin(name: str, group: str, key: str) -> Callable[..., Any]:
    """The callable `name` names; one ConfigError naming `key` and the cause if it cannot be
    had (the module does not import, the attribute is missing, it is not callable)."""
    return _load(name, group, key)


def lookup(registry: Registry[T], name: str, group: str, key: str,
           make: Callable[[str], T], what: str) -> T:
    """The built-in entry `name` of `registry`, else the plugin it names (`make` wraps it);
    an unknown name lists both, and says how to name one's own `what`."""
    if name in registry:
        return registry.get(name)
    if is_plugin(name, group):
        load_plugin(name, group, key)  # fails now if it cannot be imported
        return make(name)
    choices = registry.names() + sorted(installed(group))
    raise ConfigError(unknown_choice_message(registry.family, name, choices)
                      + f" Or your own {what} by import path: {key}: pkg.module:callable.")


def call_plugin(fn: Callable[..., Any], name: str, key: str, **kwargs: Any) -> Any:
    """Call a plugin; a signature that does not take `kwargs`, or an exception inside, is one
    ConfigError naming it."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}: {name} does not take the arguments "
                          f"{', '.join(kwargs) or '(none)'}: {e}") from e
    except ValueError:  # no signature to read (a builtin): let the call say
        pass
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code failed: say where and why
        raise ConfigError(f"{key}: {name} raised {type(e).__name__}: {e}") from e
