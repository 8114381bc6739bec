"""One trial's life: the single ask/tell runner every kind of trial goes through, the built-in,
packed and user trials it runs, their artifacts, history and checkpoints, and the public API
users' own training code sees (`Trial`, `Pruned`, `report`, ...: `search.trial._api`).

Names load on first use (`search._lazy`): the GPU readings and the user API import neither
torch nor Optuna.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from search._lazy import lazy_face

__all__, __getattr__, __dir__ = lazy_face(__name__, {
    "ArtifactRecorder": "_artifacts",
    "End": "_outcome",
    "Ended": "_outcome",
    "GPU_FULL": "_outcome",
    "STOP_REQUESTED": "_outcome",
    "Step": "_outcome",
    "TrialRunner": "_runner",
    "BUSY_UTILIZATION": "_gpu",
    "FAKE_MEMORY_ENV": "_gpu",
    "GpuProbe": "_gpu",
    "GpuReading": "_gpu",
    "MEMORY_MARGIN": "_gpu",
    "NvidiaSmi": "_gpu",
    "Objective": "_objective",
    "PackRunner": "_packing",
    "Pruned": "_api",
    "RemoteCheckpoints": "_remote_checkpoints",
    "Reported": "_api",
    "SimulatedGpus": "_gpu",
    "StopRequested": "_api",
    "Trial": "_api",
    "TrialOutcome": "_outcome",
    "UserObjective": "_user",
    "YIELD_ENV": "_gpu",
    "checkpoint_dir": "_api",
    "default_probe": "_gpu",
    "fixed_params": "_user",
    "history_record": "_history",
    "is_final": "_api",
    "oom_from_sharing": "_gpu",
    "params": "_api",
    "report": "_api",
    "run_command": "_command",
    "shared_gpu_oom": "_gpu",
    "write_study_note": "_artifacts",
})

if TYPE_CHECKING:  # the names above, for type checkers and readers
    from search.trial._api import (  # noqa: F401
        Pruned,
        Reported,
        StopRequested,
        Trial,
        checkpoint_dir,
        is_final,
        params,
        report,
    )
    from search.trial._artifacts import ArtifactRecorder, write_study_note  # noqa: F401
    from search.trial._command import run_command  # noqa: F401
    from search.trial._gpu import (  # noqa: F401
        BUSY_UTILIZATION,
        FAKE_MEMORY_ENV,
        MEMORY_MARGIN,
        YIELD_ENV,
        GpuProbe,
        GpuReading,
        NvidiaSmi,
        SimulatedGpus,
        default_probe,
        oom_from_sharing,
        shared_gpu_oom,
    )
    from search.trial._history import history_record  # noqa: F401
    from search.trial._objective import Objective  # noqa: F401
    from search.trial._outcome import GPU_FULL, STOP_REQUESTED, End, Ended, Step, TrialOutcome  # noqa: F401
    from search.trial._packing import PackRunner  # noqa: F401
    from search.trial._remote_checkpoints import RemoteCheckpoints  # noqa: F401
    from search.trial._runner import TrialRunner  # noqa: F401
    from search.trial._user import UserObjective, fixed_params  # noqa: F401
