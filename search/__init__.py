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

from typing import TYPE_CHECKING

from search._lazy import lazy_face

# Every public name loads from its module on first use.
__all__, __getattr__, __dir__ = lazy_face(__name__, {
    "Pruned": "search.trial",
    "Results": "search._api",
    "SearchError": "search._errors",
    "SpecError": "search._errors",
    "StorageError": "search._errors",
    "StudyNotFoundError": "search._errors",
    "Trial": "search.trial",
    "checkpoint_dir": "search.trial",
    "is_final": "search.trial",
    "load_results": "search._api",
    "params": "search.trial",
    "report": "search.trial",
    "tune": "search._api",
})

if TYPE_CHECKING:
    from search._api import Results, load_results, tune  # noqa: F401
    from search._errors import SearchError, SpecError, StorageError, StudyNotFoundError  # noqa: F401
    from search.trial import Pruned, Trial, checkpoint_dir, is_final, params, report  # noqa: F401
