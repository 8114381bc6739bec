"""The public faces of `search` and `trainers` hold: the names users may import are listed in
`__all__` (sorted, once each), every one of them resolves, the classes and functions among them
say what they are in a docstring of their own, and `dir()` shows them.

The expected lists are written out here, so adding or removing a public name is a deliberate
change of this file too. Subpackages of `search` with an `__all__` are found by walking its
folders, so a new one is checked the day it appears. That `import search` stays cheap (no torch,
no Optuna) is checked in a fresh interpreter by
tests/search_tests/test_user_trainer.py::test_the_command_helpers_import_neither_torch_nor_optuna.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import search
import trainers

SEARCH_ALL = [
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

TRAINERS_ALL = [
    "Args",
    "CONFIG_SECTIONS",
    "CheckpointStore",
    "ConfigError",
    "DATASETS",
    "DATASET_GROUP",
    "Data",
    "DataConfig",
    "DataNotFoundError",
    "EpochMetrics",
    "INITS",
    "InitConfig",
    "KNOB_ALIASES",
    "LRFindResult",
    "LRPlan",
    "LR_SCHEDULES",
    "MODELS",
    "MODEL_GROUP",
    "ModelConfig",
    "OPTIMIZERS",
    "OptimizerConfig",
    "Pack",
    "Schedule",
    "ScheduleConfig",
    "Shard",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "TrainerError",
    "build_optimizer",
    "check_names",
    "closest",
    "config_from_dict",
    "data_for",
    "effective_lr",
    "installed_plugins",
    "is_plugin_argument",
    "knob_names",
    "load_data",
    "load_plugin",
    "lr_plan",
    "lr_range_test",
    "names_trusted",
    "network_key",
    "pack_key",
    "pack_refusal",
    "plugin_sections",
    "prepare_model",
    "resolve_device",
    "scale_lr",
    "steps_per_epoch",
    "train",
    "unscale_lr",
]


def _search_subpackages() -> list[str]:
    """Every package below `search` (search.spec, search.storage, …), found on disk without
    importing them: `pkgutil.walk_packages` would skip, silently, one that fails to import."""
    root = Path(search.__file__).parent
    return sorted(".".join(("search", *init.parent.relative_to(root).parts))
                  for init in root.rglob("*/__init__.py"))


def _faces() -> list[str]:
    """The packages whose `__all__` is a public face: search, trainers, and the subpackages
    of search that declare one."""
    subs = [name for name in _search_subpackages()
            if "__all__" in vars(importlib.import_module(name))]
    return ["search", "trainers", *subs]


def _needs_docstring(value: Any) -> bool:
    return inspect.isclass(value) or inspect.isroutine(value) or hasattr(value, "__wrapped__")


def _own_docstring(value: Any) -> str:
    """The docstring written for `value`: a class's own (not inherited), and not the signature
    that `dataclasses` fills in for a class without one."""
    doc = vars(value).get("__doc__") if inspect.isclass(value) else value.__doc__
    doc = (doc or "").strip()
    if inspect.isclass(value) and dataclasses.is_dataclass(value) and doc.startswith(
            f"{value.__name__}("):
        return ""
    return doc


@pytest.mark.parametrize(("package", "expected"), [(search, SEARCH_ALL),
                                                   (trainers, TRAINERS_ALL)],
                         ids=["search", "trainers"])
def test_all_is_the_expected_list_sorted_and_unique(package: ModuleType,
                                                    expected: list[str]) -> None:
    assert expected == sorted(set(expected)), "keep the expected list sorted and unique"
    assert list(package.__all__) == expected


def test_the_search_subpackages_are_found() -> None:
    assert {"search.run", "search.spec", "search.storage", "search.views"} <= set(_faces())


@pytest.mark.parametrize("name", _faces())
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    module = importlib.import_module(name)
    names = list(module.__all__)
    assert len(names) == len(set(names)), f"{name}.__all__ names some twice"
    unresolved, undocumented = [], []
    for attr in names:
        try:
            value = getattr(module, attr)
        except (AttributeError, ImportError) as e:
            unresolved.append(f"{attr} ({type(e).__name__}: {e})")
            continue
        if _needs_docstring(value) and not _own_docstring(value):
            undocumented.append(attr)
    assert not unresolved, f"{name}.__all__ names that do not resolve: {unresolved}"
    assert not undocumented, f"{name}: public classes and functions without a docstring: " + (
        ", ".join(undocumented))


@pytest.mark.parametrize("name", _faces())
def test_dir_lists_all(name: str) -> None:
    module = importlib.import_module(name)
    missing = sorted(set(module.__all__) - set(dir(module)))
    assert not missing, f"dir({name}) lacks {missing}"
