"""Running a study: creating or joining it, workers and their supervisor, the objective that
trains one trial, checkpoints, trial artifacts, the LR range test, warm starts and retrain.

Names load on first use: planning worker slots (`plan`) imports neither torch nor Optuna, so a
single GPU worker is pinned with `CUDA_VISIBLE_DEVICES` before either loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name → the private module that defines it.
_EXPORTS = {
    "ArtifactRecorder": "_artifacts",
    "Display": "_supervisor",
    "Launch": "_launch",
    "Objective": "_objective",
    "Pruned": "_user_trainer",
    "RayRequest": "_ray",
    "Slot": "_slots",
    "SlurmArray": "_slurm",
    "Trial": "_user_trainer",
    "TrialOutcome": "_objective",
    "UserObjective": "_user_trainer",
    "WarmStart": "_warm_start",
    "WorkerError": "_worker",
    "WorkerSummary": "_worker",
    "create_or_load": "_study",
    "delete_study_files": "_manage",
    "final_test": "_retrain",
    "for_new_study": "_lr_find",
    "history_record": "_history",
    "load_source": "_warm_start",
    "lr_find": "_lr_find",
    "needs_test": "_lr_find",
    "parse_source": "_warm_start",
    "plan": "_slots",
    "plan_slots": "_slots",
    "ray_request": "_ray",
    "reseed": "_study",
    "retrain": "_retrain",
    "retrain_and_report": "_retrain",
    "run_study": "_launch",
    "run_worker": "_worker",
    "stop_study": "_manage",
    "submit_slurm": "_slurm",
    "supervise": "_supervisor",
    "supervise_ray": "_ray",
    "visible_gpu_ids": "_slots",
    "warm_start": "_warm_start",
    "worker_command": "_supervisor",
    "write_study_note": "_artifacts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # the names above, for type checkers and readers
    from search.run._artifacts import ArtifactRecorder, write_study_note  # noqa: F401
    from search.run._history import history_record  # noqa: F401
    from search.run._launch import Launch, run_study  # noqa: F401
    from search.run._lr_find import for_new_study, lr_find, needs_test  # noqa: F401
    from search.run._manage import delete_study_files, stop_study  # noqa: F401
    from search.run._objective import Objective, TrialOutcome  # noqa: F401
    from search.run._ray import RayRequest, ray_request, supervise_ray  # noqa: F401
    from search.run._retrain import final_test, retrain, retrain_and_report  # noqa: F401
    from search.run._slots import Slot, plan, plan_slots, visible_gpu_ids  # noqa: F401
    from search.run._slurm import SlurmArray, submit_slurm  # noqa: F401
    from search.run._study import create_or_load, reseed  # noqa: F401
    from search.run._supervisor import Display, supervise, worker_command  # noqa: F401
    from search.run._user_trainer import Pruned, Trial, UserObjective  # noqa: F401
    from search.run._warm_start import WarmStart, load_source, parse_source, warm_start  # noqa: F401
    from search.run._worker import WorkerError, WorkerSummary, run_worker  # noqa: F401
