"""Errors raised by the trainers package."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of every error the trainers package raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A training configuration names an unknown thing or holds a value of the wrong kind."""


class DataNotFoundError(TrainerError, FileNotFoundError):
    """A dataset's files are in none of the places looked."""
