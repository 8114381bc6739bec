"""`hpsearch slurm`: a study's workers as a Slurm job array, submitted through submitit.

Each array task is one node's share: `hpsearch worker NAME --gpus auto --trials-per-gpu M` under
the `CUDA_VISIBLE_DEVICES` Slurm gives it (or `--gpus none --workers K` on CPU nodes). One task
per node, not per GPU, so `--nodes N` is what Slurm is asked for and the worker's own supervisor
(pinning, trials per GPU, Ctrl-C) runs unchanged on each node. The tasks meet in the storage.

The stored spec is read before anything is printed or submitted: a study whose trials take N
GPUs (`resources.gpus`) needs a `--gpus-per-node` that N divides (each task's worker runs G/N
trials of N GPUs), and one of N CPU processes (`resources.processes`) gets N cores per worker.

Preemption and time limits: submitit's sbatch script asks for `--signal=USR2@90`; on that
signal submitit calls `ArrayTask.checkpoint`, which stops the worker as Ctrl-C does (its trial
ends "interrupted" and is queued again), and then requeues the task; the trial is taken first,
by the requeued task or any other worker, and resumes from its last epoch's checkpoint.
SIGTERM, which Slurm sends every process of the task (scancel, a preemption without the user
signal), ends the worker the same way; Slurm requeues a preempted task itself.

The storage URL, password included, travels in the task's pickle in `--folder` (created private
to its owner), never in what is printed. Light to import: submitit loads only to write or submit.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search._errors import SearchError, SpecError
from search._log import logger
from search._process import die_with_parent
from search._urls import redact
from search.workers._engines import import_engine, shared_storage

if TYPE_CHECKING:
    import optuna

    from search.spec import Resources, StudySpec

LOG = logger("workers")
LAUNCHER = "hpsearch slurm"
STOP_GRACE_S = 45.0  # SIGINT to SIGKILL; inside the 90 s between USR2 and Slurm's kill
SIGNAL_DELAY_S = 90  # submitit's default: USR2 this long before the time limit
DEFAULT_TIME = "04:00:00"
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>\d{1,2}):(?P<seconds>\d{1,2})$")


def parse_time(text: str) -> int:
    """Slurm's `HH:MM:SS` (or `D-HH:MM:SS`) as whole minutes, rounded up as Slurm does."""
    m = _TIME.match(text.strip())
    if m is None or int(m["minutes"]) > 59 or int(m["seconds"]) > 59:
        raise SpecError(f"--time: expected HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00), got {text!r}")
    seconds = (((int(m["days"] or 0) * 24 + int(m["hours"])) * 60 + int(m["minutes"])) * 60
               + int(m["seconds"]))
    if seconds <= 0:
        raise SpecError(f"--time: expected a positive time limit, got {text!r}")
    return -(-seconds // 60)


@dataclass(frozen=True)
class SlurmArray:
    """The workers of one study as a Slurm job array: `nodes` tasks of `gpus_per_node` GPUs
    (`trials_per_gpu` workers each), or of `workers` CPU workers when `gpus_per_node` is 0."""

    name: str
    url: str = field(repr=False)  # with its password: in the pickle only, never printed
    nodes: int = 1
    gpus_per_node: int = 1
    trials_per_gpu: int | str = "auto"  # or a fixed count
    workers: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time_min: int = 240
    folder: Path = Path("slurm")
    resources: Resources | None = None  # the study's trial width, from its stored spec

    def __post_init__(self) -> None:
        shared_storage(self.url, LAUNCHER)  # SQLite cannot be shared by other nodes
        per_gpu = None if self.trials_per_gpu == "auto" else self.trials_per_gpu
        for flag, value in (("--nodes", self.nodes), ("--trials-per-gpu", per_gpu),
                            ("--workers", self.workers), ("--cpus-per-task", self.cpus_per_task),
                            ("--time", self.time_min)):
            if value is not None and value < 1:
                raise SpecError(f"{flag}: expected a positive integer, got {value!r}")
        if self.gpus_per_node < 0:
            raise SpecError(f"--gpus-per-node: expected 0 (CPU nodes) or more, "
                            f"got {self.gpus_per_node!r}")
        if self.gpus_per_node and self.workers is not None:
            raise SpecError("--workers: with GPUs each task runs --trials-per-gpu workers per "
                            "GPU; --workers K is for CPU nodes (--gpus-per-node 0)")
        if not self.gpus_per_node and self.trials_per_gpu not in ("auto", 1):
            raise SpecError("--trials-per-gpu: CPU nodes (--gpus-per-node 0) take --workers K")
        self._check_width()

    @property
    def width(self) -> int:
        """The processes (ranks) of one trial of the study."""
        return self.resources.width if self.resources is not None else 1

    def _check_width(self) -> None:
        """What a task could not run for the study's trial width: refused before submitting,
        where each task's worker would refuse it on its node."""
        r = self.resources
        if r is None or r.width == 1:
            return
        if isinstance(self.trials_per_gpu, int) and self.trials_per_gpu > 1:
            raise SpecError(f"--trials-per-gpu {self.trials_per_gpu}: the study's trials take "
                            f"{r.label} each (resources) and their devices whole; leave "
                            "--trials-per-gpu out")
        g, n = self.gpus_per_node, r.gpus
        if n is not None and (g == 0 or g % n):
            fits = ", ".join(f"--gpus-per-node {k}" for k in sorted({max(n, g - g % n),
                                                                      g - g % n + n}))
            why = f", and {n} does not divide {g}" if g else ""
            raise SpecError(f"--gpus-per-node {g}: the study's trials take {n} GPUs of one node "
                            f"each (resources.gpus){why}; give a multiple of {n} ({fits})")
        if r.processes is not None and self.cpus_per_task is not None \
                and self.cpus_per_task < r.processes:
            raise SpecError(f"--cpus-per-task {self.cpus_per_task}: the study's trials take "
                            f"{r.processes} processes each (resources.processes); give at "
                            f"least {r.processes}")

    @classmethod
    def build(cls, name: str, storage: str | None, *, time: str | None = None,
              folder: str | Path | None = None, **options: Any) -> SlurmArray:
        """From the command line's values: the storage resolved (SQLite refused), the time
        parsed, the folder `slurm-NAME` in the working directory unless given."""
        url = shared_storage(storage, LAUNCHER)
        return cls(name=name, url=url, time_min=parse_time(time or DEFAULT_TIME),
                   folder=Path(folder or f"slurm-{name}").absolute(), **options)

    def worker_args(self) -> list[str]:
        """What each array task runs, after `hpsearch` (the real URL: not for printing)."""
        # --unless-stopped: a task pending in the queue or requeued after `hpsearch stop` ends
        # at once, where a plain `worker` would clear the stop and resume the study.
        args = ["worker", self.name, "--storage", self.url, "--unless-stopped"]
        if self.gpus_per_node:
            return args + ["--gpus", "auto", "--trials-per-gpu", str(self.trials_per_gpu)]
        return args + ["--gpus", "none", "--workers", str(self.workers or 1)]

    def worker_line(self) -> str:
        """The worker command as shown: the password as ***."""
        return redact(shlex.join(["hpsearch", *self.worker_args()]))

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters: one task on one node per array task."""
        cpus = self.cpus_per_task or self._default_cpus()
        params: dict[str, Any] = {
            "job_name": f"hpsearch-{self.name}", "time": self.time_min, "nodes": 1,
            "ntasks_per_node": 1, "gpus_per_node": self.gpus_per_node or None,
            "cpus_per_task": cpus, "partition": self.partition, "account": self.account,
            "signal_delay_s": SIGNAL_DELAY_S, "array_parallelism": self.nodes,
            "additional_parameters": {"requeue": True},  # preempted tasks come back
        }
        return {k: v for k, v in params.items() if v is not None}

    def _default_cpus(self) -> int | None:
        """Cores per task when `--cpus-per-task` is not given: a core per process where the
        trials run on CPU cores (K workers of N ranks each on CPU nodes; on GPU nodes, a
        worker per GPU whose trials are N CPU processes), else Slurm's default."""
        if not self.gpus_per_node:
            return (self.workers or 1) * self.width
        if self.resources is not None and self.resources.processes and self.width > 1:
            return self.gpus_per_node * self.width
        return None

    def script(self) -> str:
        """The sbatch script submitit writes for this array (what `--dry-run` prints)."""
        import_engine("submitit", LAUNCHER)
        # The function submitit's SlurmExecutor writes its script with; the executor itself
        # cannot be built off a cluster (it looks for srun).
        from submitit.slurm.slurm import _make_sbatch_string

        command = (f"{shlex.quote(sys.executable)} -u -m submitit.core._submit "
                   f"{shlex.quote(str(self.folder))}")
        return _make_sbatch_string(command=command, folder=self.folder,
                                   map_count=self.nodes if self.nodes > 1 else None,
                                   **self.sbatch_parameters())

    def submit(self, *, executor: Any = None) -> list[Any]:
        """Submit the array (through `executor`, submitit's SlurmExecutor by default); its jobs."""
        submitit = import_engine("submitit", LAUNCHER)
        if not self.folder.exists():  # the pickles hold the storage URL, password included
            self.folder.mkdir(parents=True, mode=0o700)
        elif self.folder.stat().st_mode & 0o077 and redact(self.url) != self.url:
            LOG.warning(f"{self.folder} is open to other users, and the task pickles there "
                        "hold the storage password")
        if executor is None:
            executor = submitit.SlurmExecutor(folder=self.folder)
            executor.update_parameters(**self.sbatch_parameters())
        task = ArrayTask(self.worker_args())
        echoed = io.StringIO()  # submitit prints sbatch's complaint too: said once, below
        try:
            with contextlib.redirect_stderr(echoed):
                return executor.map_array(task, range(self.nodes))
        except Exception as e:  # sbatch refused it: its own words
            why = " ".join((str(e) or echoed.getvalue()).split())
            raise SearchError(f"{LAUNCHER}: submitting failed: {redact(why)}") from e


def submit_slurm(name: str, storage: str | None, *, dry_run: bool = False, **options: Any) -> int:
    """`hpsearch slurm`: print the batch script (`dry_run`), or check the study and submit.
    Either reads the study's stored spec first, so the script is the one submitted."""
    array = SlurmArray.build(name, storage, **options)
    import_engine("submitit", LAUNCHER)  # said before the storage is reached
    if not dry_run:
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise SpecError(f"{LAUNCHER}: {' and '.join(missing)} not found on PATH: run it on a "
                            f"Slurm login node, or add --dry-run to print the batch script")
    study, spec = _stored(array)  # no array for a typo, nor for a width it cannot hold
    array = replace(array, resources=spec.resources)
    if dry_run:
        print(array.script(), end="")
        print(f"# each of the {array.nodes} task(s) runs (pickled into {array.folder} when "
              f"submitted):\n# {array.worker_line()}")
        return 0
    from search.storage import clear_stop

    jobs = array.submit()
    if clear_stop(study):  # as `run` and `worker` do: the new tasks resume a stopped study
        print(f"resuming study {name!r} after `hpsearch stop`")
    job_id = str(jobs[0].job_id).split("_")[0]
    logs = array.folder / (f"{job_id}_<task>_0_log.out" if array.nodes > 1
                           else f"{job_id}_0_log.out")
    print(f"submitted Slurm job {job_id}: {array.nodes} array task(s) of {_share(array)}, each "
          f"running `{array.worker_line()}`")
    print(f"follow: squeue -j {job_id}; hpsearch status {shlex.quote(name)} --storage "
          f"{shlex.quote(redact(array.url))}; logs: {logs}")
    print(f"cancel: scancel {job_id} (running trials are queued again and resume from their "
          f"checkpoints); or pause the study on every machine: hpsearch stop {shlex.quote(name)}")
    return 0


def _stored(array: SlurmArray) -> tuple[optuna.Study, StudySpec]:
    """The study the array joins, and its stored spec (a study not in the storage: exit 2)."""
    from search.spec import spec_from_json
    from search.storage import open_storage, open_study

    study, stored = open_study(array.name, open_storage(array.url, must_exist=True))
    return study, spec_from_json(stored)


def _share(array: SlurmArray) -> str:
    """One task's share, as `submit_slurm` says it: `4 GPU(s) as 2 trial slot(s) of 2 GPUs`."""
    r, gpus = array.resources, array.gpus_per_node
    wide = f" of {r.label}" if r is not None and r.width > 1 else ""
    if not gpus:
        return f"{array.workers or 1} CPU worker(s)" + (f"{wide} a trial" if wide else "")
    if r is not None and r.gpus is not None and wide:
        return f"{gpus} GPU(s) as {gpus // r.gpus} trial slot(s){wide}"
    if wide:  # a wide trial takes its GPU whole: no more workers are added to it
        return f"{gpus} GPU(s) x 1 trial{wide}"
    per_gpu = ("trials by memory (auto)" if array.trials_per_gpu == "auto"
               else f"{array.trials_per_gpu} trial(s)")
    return f"{gpus} GPU(s) x {per_gpu}"


class ArrayTask:
    """One array task, as submitit runs it on a node: `hpsearch worker` in a child process.

    Slurm signals every process of the task. The worker ignores the preemption signal (and so
    do the processes it starts, which would die of it), and this process stops it with SIGINT,
    Ctrl-C, which a lone worker and a supervisor of several both end on cleanly. SIGTERM the
    worker takes itself, as Ctrl-C, so its trial is queued again exactly once.
    """

    def __init__(self, args: list[str], *, stop_grace_s: float = STOP_GRACE_S) -> None:
        self.args = list(args)
        self.stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:  # requeued as it was submitted
        return {"args": self.args, "stop_grace_s": self.stop_grace_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["args"], stop_grace_s=state["stop_grace_s"])

    def __call__(self, index: int) -> int:
        print(f"{LAUNCHER}: array task {index} on {socket.gethostname()} "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): "
              f"{redact(shlex.join(['hpsearch', *self.args]))}", flush=True)
        self._proc = subprocess.Popen([sys.executable, "-m", "search.cli", *self.args],
                                      preexec_fn=_worker_signals)
        try:
            while self._proc.poll() is None:
                time.sleep(0.5)
        finally:  # an error, or submitit exiting after a requeue: leave no worker behind
            if self._proc.poll() is None:
                self._stop()
                self._proc.wait()
        code = self._proc.returncode
        if code in (0, 130):  # done, or interrupted: its trial is queued again
            return code
        raise SearchError(f"array task {index}: hpsearch worker exited with code {code} "
                          f"(its messages are above)")

    def checkpoint(self, index: int) -> Any:
        """submitit's preemption and time-limit hook: stop the worker, then requeue this task
        as it is; its interrupted trial waits in the storage and resumes from its checkpoint."""
        from submitit.helpers import DelayedSubmission

        self._stop()
        return DelayedSubmission(self, index)

    def _stop(self) -> None:
        """SIGINT, then wait (SIGKILL after the grace period). Runs inside signal handlers,
        where Popen's own wait may be mid-call: the exit is seen without reaping (WNOWAIT)."""
        proc = self._proc
        if proc is None or proc.returncode is not None or _exited(proc.pid):
            return
        os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + self.stop_grace_s
        while not _exited(proc.pid):
            if time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _worker_signals() -> None:
    """Runs in the worker before exec: the preemption signal is ignored (which survives exec,
    into the trials' processes too); SIGINT comes should the task die."""
    preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"),
                      signal.SIGUSR2)
    signal.signal(preempt, signal.SIG_IGN)
    die_with_parent(signal.SIGINT)
