"""hpsearch's study service: study files, the search space, storage, workers and the CLI.

Importing this package is cheap (no torch, no optuna); commands import what they need.
"""

from __future__ import annotations

from search._errors import SearchError, SpecError, StorageError, StudyNotFoundError

__all__ = ["SearchError", "SpecError", "StorageError", "StudyNotFoundError"]
