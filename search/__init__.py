"""hpsearch's study service: study files, the search space, storage, workers and the CLI.

The public Python API, for notebooks and for your own training code:

- `tune(spec, storage=..., workers=...)` runs a study (a mapping or a study file) as
  `hpsearch run` does, and `load_results(name, storage=...)` reads one back (`Results`);
- `Trial` is what a `trainer: pkg.module:fit` function gets (`report`, checkpoints, device),
  and `Pruned` what `Trial.report` raises when the trial should stop;
- `report`, `params`, `checkpoint_dir` and `is_final` are for a script run by `trainer:
  {command: [...]}` (they import neither torch nor Optuna).

Importing this package is cheap (no torch, no Optuna); the names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from search._errors import SearchError, SpecError, StorageError, StudyNotFoundError
from search._reporting import checkpoint_dir, is_final, params, report

# Public name → the module that defines it, imported when the name is first used.
_LAZY = {
    "Pruned": "search.run",
    "Trial": "search.run",
    "Results": "search._api",
    "load_results": "search._api",
    "tune": "search._api",
}

__all__ = [
    "Pruned",
    "Results",
    "SearchError",
    "SpecError",
    "StorageError",
    "StudyNotFoundError",
    "Trial",
    "checkpoint_dir",
    "is_final",
    "load_results",
    "params",
    "report",
    "tune",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from search._api import Results, load_results, tune  # noqa: F401
    from search.run import Pruned, Trial  # noqa: F401
