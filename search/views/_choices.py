"""`hpsearch list`: every name a study file may use, built in or installed, and how to add one."""

from __future__ import annotations

import trainers
from search.spec import PRUNERS, SAMPLERS


def kinds() -> dict[str, tuple[str, list[str], str | None]]:
    """kind → (the study-file key, its built-in names, the entry-point group that extends it);
    the trainer's registries load with it (torch)."""
    return {
        "models": ("model.type", trainers.MODELS.names(), trainers.MODEL_GROUP),
        "datasets": ("data.dataset", trainers.DATASETS.names(), trainers.DATASET_GROUP),
        "optimizers": ("optimizer", trainers.OPTIMIZERS.names(), None),
        "schedules": ("scheduler", trainers.LR_SCHEDULES.names(), None),
        "inits": ("init", trainers.INITS.names(), None),
        "samplers": ("sampler.type", list(SAMPLERS), None),
        "pruners": ("pruner.type", list(PRUNERS), None),
    }


def choices_text(names: list[str]) -> str:
    """The names of each kind, built-in and installed, one kind a paragraph."""
    table = kinds()
    out = []
    for kind in names:
        key, builtin, group = table[kind]
        lines = [f"{kind} ({key}):", f"  built in: {', '.join(builtin)}"]
        if group is not None:
            plugins = trainers.installed_plugins(group)
            shown = ", ".join(f"{name} ({ep.value})" for name, ep in sorted(plugins.items()))
            lines.append(f"  installed ({group}): {shown or 'none'}")
            lines.append("  your own: an import path, e.g. " + key + ": mypkg.module:callable")
        elif kind in ("samplers", "pruners"):
            lines.append(f"  any other: an import path, e.g. {key}: mypkg.module:Class (a "
                         f"subclass of optuna.{kind}.Base{kind[:-1].title()})")
        out.append("\n".join(lines))
    return "\n\n".join(out)
