"""The errors the search package raises on purpose; the CLI maps them to exit codes."""

from __future__ import annotations


class SearchError(Exception):
    """Base class of every error hpsearch raises on purpose."""


class SpecError(SearchError):
    """Bad user input: a study file, an argument, an enqueued config (the CLI exits 2).

    ``path`` is the key path inside the study file (``space.lr.low``) when one applies.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class StudyNotFoundError(SpecError):
    """No study of that name in the storage."""


class StorageError(SearchError):
    """The storage failed at run time (the CLI exits 1)."""
