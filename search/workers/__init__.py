"""Worker processes and where they run: the worker loop over a study's trials, the supervisor
of a machine's workers, GPU slots and `--trials-per-gpu auto`, and the Ray and Slurm launchers.

Names load on first use (`search._lazy`): planning worker slots (`plan`) imports neither torch
nor Optuna, so a single GPU worker is pinned with `CUDA_VISIBLE_DEVICES` before either loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from search._lazy import lazy_face

__all__, __getattr__, __dir__ = lazy_face(__name__, {
    "Display": "_supervisor",
    "EXIT_GPU_FULL": "_gpu_fill",
    "GPU_FULL": "_worker",
    "GpuFill": "_gpu_fill",
    "RayRequest": "_ray",
    "Slot": "_slots",
    "SlurmArray": "_slurm",
    "WorkerError": "_worker",
    "WorkerSummary": "_worker",
    "check_width": "_ray",
    "connect_ray": "_ray",
    "plan": "_slots",
    "plan_slots": "_slots",
    "ray_request": "_ray",
    "run_worker": "_worker",
    "submit_slurm": "_slurm",
    "supervise": "_supervisor",
    "supervise_ray": "_ray",
    "visible_gpu_ids": "_slots",
    "widen": "_slots",
    "worker_command": "_supervisor",
})

if TYPE_CHECKING:  # the names above, for type checkers and readers
    from search.workers._gpu_fill import EXIT_GPU_FULL, GpuFill  # noqa: F401
    from search.workers._ray import (  # noqa: F401
        RayRequest,
        check_width,
        connect_ray,
        ray_request,
        supervise_ray,
    )
    from search.workers._slots import (  # noqa: F401
        Slot,
        plan,
        plan_slots,
        visible_gpu_ids,
        widen,
    )
    from search.workers._slurm import SlurmArray, submit_slurm  # noqa: F401
    from search.workers._supervisor import Display, supervise, worker_command  # noqa: F401
    from search.workers._worker import GPU_FULL, WorkerError, WorkerSummary, run_worker  # noqa: F401
