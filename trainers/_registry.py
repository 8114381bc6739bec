"""One small registry type shared by every family (optimizers, schedules, inits, models, data)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from trainers._errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → entry table whose lookup error lists the choices (and guesses the typo)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is registered twice.")
        self._entries[name] = entry
        return entry

    def get(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(unknown_choice_message(self.family, name, self.names()))
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def closest(word: object, choices: list[str]) -> str | None:
    """The choice a typo most likely meant (difflib's closest match), or None."""
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, choices, n=1)
    return close[0] if close else None


def guess(word: object, choices: list[str]) -> str:
    """`` Did you mean 'x'?`` when a choice is close to `word`, else the empty string."""
    close = closest(word, choices)
    return f" Did you mean {close!r}?" if close else ""


def unknown_choice_message(family: str, value: object, choices: list[str]) -> str:
    return (f"unknown {family} {value!r}; expected one of: {', '.join(choices)}."
            f"{guess(value, choices)}")
