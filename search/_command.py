"""The base of a CLI subcommand and the argument helpers the commands share."""

from __future__ import annotations

import argparse
from typing import Any

from search._storage import DEFAULT_URL, ENV_VAR, redact

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class Command:
    """Base of a subcommand: the docstring's first line is its help."""

    name = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def _storage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=None,
        help=f"study storage URL (default: ${ENV_VAR}, else {DEFAULT_URL})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _storage_hint(args: argparse.Namespace) -> str:
    return f" --storage {redact(args.storage)}" if args.storage else ""


def _console() -> Any:
    from rich.console import Console

    # soft_wrap: a CI log or a pipe keeps one line per trial instead of wrapping at 80 columns.
    return Console(highlight=False, soft_wrap=True)
