"""hpsearch's warnings and notices as log records, and the one handler that prints them.

Library code says what it has to say to a person through `logger("<area>")`, a logger named
``hpsearch.<area>`` (``hpsearch.trial``, ``hpsearch.storage``, …): a warning at WARNING, a
notice (a trial queued again, a port tried again) at INFO. It never touches Optuna's logging
or the root logger; who shows the records is the program's choice:

- the command line (`for_cli`, every `hpsearch …` process, workers included) prints them as
  hpsearch always printed them: one line on standard error, a warning as ``warning: …``;
- `search.tune` prints them the same way for the length of the run where the program
  configured no logging at all (`printed`); a program that did gets the records instead;
- a rank of a wide trial prints as its worker did (`printer_level`, `print_records`): it is
  a fresh process, without its worker's handlers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

ROOT = "hpsearch"


def logger(area: str) -> logging.Logger:
    """The logger of one area of hpsearch: ``hpsearch.<area>``."""
    return logging.getLogger(f"{ROOT}.{area}")


class _Line(logging.Formatter):
    """A record as the line hpsearch printed before it logged: ``warning: `` before a warning,
    a notice as it is; the traceback, where the record has one, below it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


class Printer(logging.StreamHandler):
    """Prints each record as a line on whatever `sys.stderr` is when it comes: a live
    progress display swaps it for its own, and the line must go above the display."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        logging.Handler.__init__(self, level)  # not StreamHandler's: it would fix the stream
        self.setFormatter(_Line())

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def _printer() -> Printer | None:
    return next((h for h in logging.getLogger(ROOT).handlers if isinstance(h, Printer)), None)


def print_records(level: int = logging.INFO) -> None:
    """hpsearch's records from `level` up printed by this process from now on (once)."""
    root = logging.getLogger(ROOT)
    if _printer() is None:
        root.addHandler(Printer())
    root.setLevel(level)


def printer_level() -> int | None:
    """The level this process prints hpsearch's records from; None where it prints none (a
    rank started from here prints as this process does)."""
    return logging.getLogger(ROOT).getEffectiveLevel() if _printer() is not None else None


@contextmanager
def for_cli() -> Iterator[None]:
    """hpsearch's records printed from INFO up for the length of a command (taken off after,
    for the tests that call the command line in their own process)."""
    if _printer() is not None:  # a command run by a command: printed already
        yield
    else:
        with _printing(logging.INFO):
            yield


@contextmanager
def printed() -> Iterator[None]:
    """hpsearch's records printed as the command line prints them, for the block, where the
    program configured no logging (no handler on the ``hpsearch`` logger or above it: a
    notebook); a program that configured logging gets the records through its own handlers."""
    root = logging.getLogger(ROOT)
    if root.hasHandlers():
        yield
    else:  # the program's level for hpsearch, where it set one
        with _printing(root.level or logging.INFO):
            yield


@contextmanager
def _printing(level: int) -> Iterator[None]:
    root = logging.getLogger(ROOT)
    before = root.level
    print_records(level)
    try:
        yield
    finally:
        printer = _printer()
        if printer is not None:
            root.removeHandler(printer)
        root.setLevel(before)
