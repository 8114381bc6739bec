"""Package faces that load their names on first use: `import search.trial` stays cheap (no
torch, no Optuna) until a name is asked for, so a GPU worker is pinned with
`CUDA_VISIBLE_DEVICES` before either loads and `hpsearch --help` is instant."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_face(package: str, exports: dict[str, str]
              ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose public names are defined in
    the modules `exports` maps them to (a private module of the package, or a full name)."""
    names = sorted(exports)

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        full = module if "." in module else f"{package}.{module}"
        value = getattr(importlib.import_module(full), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:  # noqa: N807 - the module hook
        return list(names)

    return names, __getattr__, __dir__
