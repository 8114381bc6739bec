"""`run`/`worker --ray [ADDRESS]`: a study's workers as Ray actors on a Ray cluster.

Ray only places the workers; they meet in the study's SQL storage as local workers do. Each
actor runs the very command a local supervisor starts (`hpsearch worker NAME --worker-index i`)
as its child process, rather than the study in its own process: the child inherits the
`CUDA_VISIBLE_DEVICES` Ray gave the actor before torch loads, keeps the local workers' SIGINT
handling (the trial is checkpointed and queued again) and their exit codes, and the actor
itself stays a small process that never imports torch. The child dies with its actor
(PDEATHSIG SIGKILL), as it would with a lost node: its trial goes stale and the heartbeat path
retries it, resuming from its last checkpoint (`run.checkpoint_dir` on a shared folder or
`s3://`). Ray restarts an actor whose node died on another node (`max_restarts`) and runs its
worker again there.

A trial of N processes (`resources`) stays on one node: with ``gpus: N`` each actor asks Ray for
N GPUs and its worker runs the trial's N ranks on the `CUDA_VISIBLE_DEVICES` Ray gave it; with
``processes: N`` a CPU actor asks for at least N CPUs, split between the ranks.

Light to import: bad input is refused before Ray, Optuna or torch load.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search._errors import SearchError, SpecError
from search._process import die_with_parent
from search.workers._engines import import_engine, shared_storage
from search.workers._slots import check_sharing

if TYPE_CHECKING:
    from types import ModuleType

    import optuna

    from search.spec import Resources, StudySpec
    from search.storage import Counts
    from search.workers._supervisor import Display

LOCAL = "local"  # `--ray` without an address: a Ray instance started here for this run
DEFAULT_PORTS = {"ray://": 10001, "": 6379}  # Ray Client's port, the GCS port
CONNECT_TIMEOUT_S = 5.0
MAX_RESTARTS = 4  # an actor restarted on another node after its node died, this many times
PLACEMENT_WARNING_S = 60.0  # a worker not placed by then: the cluster is full, said once
FINISH_GRACE_S = 60.0  # budget met: how long a worker still starting (restarted) may take
STOP_GRACE_S = 8.0  # Ctrl-C to killing the actors: as the local supervisor waits
POLL_S = 1.0
# The driver's settings the workers need on other nodes (artifact store, S3 endpoint and keys).
FORWARDED_ENV = ("HPSEARCH_", "AWS_")
NODE_ENV, GPU_ENV = "HPSEARCH_RAY_NODE", "HPSEARCH_RAY_GPU"  # recorded per trial


@dataclass(frozen=True)
class RayRequest:
    """What `--ray` was asked for: where the cluster is and how many workers of which kind."""

    address: str  # "local", "auto", "ray://host:10001" or a GCS "host:6379"
    gpus: str = "auto"  # auto | none
    trials_per_gpu: int = 1
    workers: int | None = None


@dataclass(frozen=True)
class RaySlot:
    """One worker actor: its index and the resources it asks Ray for."""

    index: int
    device: str  # "cuda" or "cpu"
    num_cpus: float
    num_gpus: float
    ranks: int = 1  # processes a trial (`resources`): a GPU each, or the CPUs split between them


def ray_request(address: str, *, gpus: str, trials_per_gpu: int, workers: int | None,
                storage: str | None) -> RayRequest:
    """`--ray`'s settings, refused (SpecError, exit 2) where they cannot work on a cluster;
    SearchError (exit 1) when no cluster answers at the address."""
    if gpus not in ("auto", "none"):
        raise SpecError(f"--gpus {gpus}: GPU ids mean nothing with --ray (each node numbers "
                        "its own GPUs, and Ray assigns them); use --gpus auto (one worker per "
                        "free GPU slot in the cluster) or --gpus none")
    shared_storage(storage, "--ray")
    import_engine("ray", "--ray")
    probe(address)  # now, before torch and Optuna load for the study
    return RayRequest(address, gpus, trials_per_gpu, workers)


def check_width(request: RayRequest, resources: Resources, *,
                pack: int | str | None = None) -> None:
    """SpecError (exit 2) for what a trial of several processes (`resources`) cannot share on
    Ray: its GPUs split between trials (`--trials-per-gpu` above 1), `--pack`, or GPUs a trial
    with `--gpus none`."""
    if resources.width == 1:
        return
    check_sharing(resources, trials_per_gpu=request.trials_per_gpu, pack=pack)
    if resources.gpus is not None and request.gpus == "none":
        raise SpecError(f"--gpus none: the study's trials take {resources.label} each "
                        "(resources.gpus); leave --gpus out")


def plan_ray_slots(node_cpus: list[float], *, free_cpus: float, free_gpus: float,
                   request: RayRequest, node_gpus: list[float] | None = None,
                   resources: Resources | None = None) -> list[RaySlot]:
    """The worker actors for the cluster's free resources.

    GPUs (unless `--gpus none`): one actor per free GPU slot, `num_gpus = 1/trials_per_gpu`
    (no CPU reserved: the GPU is what is scarce). Else CPU workers that split the cores: each
    asks for `t` CPUs, the largest `t` that fits `--workers K` of them on the nodes; without K,
    `t` is the smallest node's CPU count (one worker per node on a cluster of equal nodes).
    `--workers K` caps the number either way.

    Trials of N processes (`resources`, checked first by `check_width`): with ``gpus: N`` an
    actor per N GPUs of one node (`node_gpus`), `num_gpus = N`; with ``processes: N`` the
    slots above, N ranks each, a CPU worker at least N CPUs of one node. A trial's processes
    are never split across nodes.
    """
    width = resources.width if resources is not None else 1
    if width > 1 and resources is not None and resources.gpus is not None:
        return _wide_gpu_slots(node_gpus or [], {"CPU": free_cpus, "GPU": free_gpus},
                               width, cap=request.workers)
    cap = request.workers
    if request.gpus == "auto" and free_gpus >= 1:
        n = int(free_gpus) * request.trials_per_gpu
        n = min(n, cap) if cap else n
        return [RaySlot(i, "cuda", 0, 1 / request.trials_per_gpu, ranks=width)
                for i in range(n)]
    return _cpu_slots(node_cpus, {"CPU": free_cpus, "GPU": free_gpus}, width, cap=cap)


def _cpu_slots(node_cpus: list[float], free: dict[str, float], width: int, *,
               cap: int | None) -> list[RaySlot]:
    """CPU workers of at least `width` CPUs each (a trial's ranks share one node's cores)."""
    cpus = [int(c) for c in node_cpus if c >= width]
    if not cpus and width > 1 and node_cpus:
        raise SpecError(f"resources.processes: {width} processes a trial, and the largest node "
                        f"of the Ray cluster has {max(node_cpus):g} CPUs (a trial runs on one "
                        "node)")
    free_cpus = free["CPU"]
    if not cpus or free_cpus < 1:
        raise SearchError(f"the Ray cluster has no free CPU for a worker (free: "
                          f"{_free_text(free)})")
    if cap is None:
        per_worker = min(cpus)
    else:
        per_worker = max([t for t in range(width, max(cpus) + 1)
                          if sum(c // t for c in cpus) >= cap] or [width])
    n = min(sum(c // per_worker for c in cpus), int(free_cpus // per_worker))
    n = min(n, cap) if cap else n
    if n < 1:
        per_worker, n = max(width, int(free_cpus)), 1  # what is free fits one worker
    return [RaySlot(i, "cpu", per_worker, 0, ranks=width) for i in range(n)]


def _wide_gpu_slots(node_gpus: list[float], free: dict[str, float], width: int, *,
                    cap: int | None) -> list[RaySlot]:
    """An actor per `width` GPUs of one node, as many as the nodes hold and are free."""
    per_node = [int(g) // width for g in node_gpus]
    if not any(per_node):
        counts = ", ".join(f"{g:g}" for g in node_gpus) or "none"
        raise SpecError(f"resources.gpus: {width} GPUs a trial, and no node of the Ray cluster "
                        f"has {width} (GPUs per node: {counts}; a trial runs on one node)")
    n = min(sum(per_node), int(free["GPU"]) // width)
    n = min(n, cap) if cap else n
    if n < 1:
        raise SearchError(f"the Ray cluster has no {width} free GPUs for a trial (free: "
                          f"{_free_text(free)})")
    return [RaySlot(i, "cuda", 0, width, ranks=width) for i in range(n)]


def idle_gpus(node_gpus: list[float], resources: Resources) -> int:
    """The GPUs no trial of ``gpus: N`` can use: each node's count beyond a multiple of N."""
    if resources.gpus is None or resources.width == 1:
        return 0
    return sum(int(g) % resources.gpus for g in node_gpus)


def _host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) to probe for a cluster address; None for "auto" and "local"."""
    if address in (LOCAL, "auto"):
        return None
    scheme = "ray://" if address.startswith("ray://") else ""
    rest = address[len(scheme):].split("/", 1)[0]
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise SpecError(f"--ray: expected auto, ray://host:10001 or host:6379, got {address!r}")
    try:
        return host.strip("[]"), int(port) if port else DEFAULT_PORTS[scheme]
    except ValueError:
        raise SpecError(f"--ray: expected a port number in {address!r}") from None


def probe(address: str) -> None:
    """SearchError (exit 1) when nothing listens at a cluster address: Ray itself retries an
    unreachable one for minutes."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SearchError(f"--ray {address}: no Ray cluster reachable there "
                          f"({e.strerror or e}); start one with `ray start --head` or give "
                          "its address (auto, ray://host:10001, host:6379)") from None


def connect_ray(request: RayRequest) -> None:
    """Join the Ray cluster at `request.address` (start one here for "local"); SearchError
    (exit 1) when none answers there."""
    import logging

    ray = import_engine("ray", "--ray")
    probe(request.address)
    options: dict[str, Any] = {"logging_level": logging.WARNING}
    if request.address == LOCAL:
        options["include_dashboard"] = False
    else:
        options["address"] = request.address
    try:
        ray.init(**options)
    except Exception as e:  # ConnectionError, a version mismatch (RuntimeError), …
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SearchError(f"--ray {request.address}: cannot join the Ray cluster: "
                          f"{first}") from None


def _die_with_actor() -> None:
    """Runs in the worker before exec: killed with its actor, as on a lost node (Linux)."""
    # Ray's worker threads ignore and block SIGINT, and both survive exec: Python would
    # install no KeyboardInterrupt handler, and the worker would never see our Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    die_with_parent(signal.SIGKILL)


class RayWorker:
    """The actor of one worker slot: runs `hpsearch worker NAME` on its node."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None

    def placement(self, slot: RaySlot, trials_per_gpu: int) -> dict[str, Any]:
        """Where Ray put this actor: node, GPUs (its CUDA_VISIBLE_DEVICES) and the CPU threads
        of each of a trial's processes."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") if slot.device == "cuda" else ""
        if slot.device == "cuda":  # the node's cores split between its GPU slots, as locally
            mine = next(n for n in ray.nodes() if n["NodeID"] == node)["Resources"]
            per_trial = max(1, int(slot.num_gpus))  # 1 for a GPU shared between trials
            slots = max(1, int(mine.get("GPU", 1)) * trials_per_gpu // per_trial)
            threads = max(1, int(mine.get("CPU", 1)) // (slots * slot.ranks))
        else:  # the actor's CPUs split between its trial's ranks
            assigned = ray.get_runtime_context().get_assigned_resources()
            threads = max(1, int(assigned.get("CPU", 1)) // slot.ranks)
        return {"node": node, "ip": ray.util.get_node_ip_address(), "gpu": gpu,
                "threads": threads, "host": socket.gethostname()}

    def run(self, slot: RaySlot, name: str, url: str, *, trials_per_gpu: int,
            timeout_s: float | None, cwd: str, pack: int | str | None = None) -> int:
        """Run the worker until the study's budget is met; its exit code. A trial of several
        processes is the worker's to start: it reads the width from the stored spec and
        runs its ranks on the GPUs Ray gave this actor."""
        where = self.placement(slot, trials_per_gpu)
        threads = str(where["threads"])
        argv = [sys.executable, "-m", "search.cli", "worker", name, "--storage", url,
                "--device", slot.device, "--threads", threads, "--quiet",
                "--worker-index", str(slot.index)]
        if timeout_s:
            argv += ["--timeout", str(timeout_s)]
        if pack is not None:  # `--pack` on the driver's command line
            argv += ["--pack", str(pack)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": where["gpu"], "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads, NODE_ENV: where["node"]}
        if where["gpu"]:
            env[GPU_ENV] = where["gpu"]
        # The driver's folder where this node shares it (relative checkpoint and artifact
        # folders then mean the same), else Ray's working folder.
        self.child = subprocess.Popen(argv, env=env, cwd=cwd if os.path.isdir(cwd) else None,
                                      preexec_fn=_die_with_actor)
        return self.child.wait()

    def interrupt(self) -> tuple[str, int | None]:
        """Ctrl-C for the worker: it checkpoints its trial and queues it again. Its host and
        pid, to find the trials it leaves."""
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
        return socket.gethostname(), None if child is None else child.pid


def forwarded_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables its workers need on other nodes."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV)}


def supervise_ray(study: optuna.Study, spec: StudySpec, url: str, request: RayRequest, *,
                  display: Display, timeout_s: float | None,
                  pack: int | str | None = None) -> int:
    """Start the worker actors, show progress until they stop, return the exit code (as
    `supervise` does for local workers)."""
    import ray

    from search.workers._supervisor import exit_code

    try:
        check_width(request, spec.resources, pack=pack)
        actors = _RayActors.start(ray, spec, url, request, display, timeout_s=timeout_s,
                                  pack=pack)
    except BaseException:  # refused, or no room: a Ray started here stops with the run
        ray.shutdown()
        raise
    old = {s: signal.signal(s, actors.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        actors.watch(study, spec)
        if actors.interrupted:
            display.console.print("interrupted: stopping the Ray workers")
            _stop(ray, study, actors.actors,
                  [r for r in actors.runs if actors.runs[r].index not in actors.codes])
        show(study, display)  # what ended since the last look
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for actor in actors.actors:  # never leave one behind, whatever happened above
            ray.kill(actor)
        ray.shutdown()  # a cluster started here for this run stops with it
    if actors.interrupted:
        return 130
    for index, code in sorted(actors.codes.items()):
        if code != 0:
            display.console.print(f"Ray worker #{index} ended with {code} (its messages are "
                                  "above)")
    return exit_code(study, spec, display)


class _RayActors:
    """The worker actors of one `supervise_ray`: their runs, where Ray placed them, and the
    codes they ended with."""

    def __init__(self, ray: ModuleType, display: Display, actors: list[Any],
                 runs: dict[Any, RaySlot], placed: dict[Any, RaySlot]) -> None:
        self.ray, self.display = ray, display
        self.actors, self.runs, self.placed = actors, runs, placed
        self.codes: dict[int, int | str] = {}
        self.interrupted = False
        self.submitted, self.warned = time.monotonic(), False

    @classmethod
    def start(cls, ray: ModuleType, spec: StudySpec, url: str, request: RayRequest,
              display: Display, *, timeout_s: float | None, pack: int | str | None
              ) -> _RayActors:
        """One actor per slot Ray has room for, each running a worker of the study."""
        nodes = [n for n in ray.nodes() if n["Alive"]]
        free = ray.available_resources()
        node_gpus = [n["Resources"].get("GPU", 0) for n in nodes]
        slots = plan_ray_slots([n["Resources"].get("CPU", 0) for n in nodes],
                               free_cpus=free.get("CPU", 0), free_gpus=free.get("GPU", 0),
                               request=request, node_gpus=node_gpus, resources=spec.resources)
        actor_class = ray.remote(RayWorker)
        env = forwarded_env()
        actors = [actor_class.options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=MAX_RESTARTS,
            max_task_retries=-1, max_concurrency=2,  # `interrupt` while `run` waits
            runtime_env={"env_vars": env} if env else None,
        ).remote() for s in slots]
        runs = {actor.run.remote(s, spec.name, url, trials_per_gpu=request.trials_per_gpu,
                                 timeout_s=timeout_s, cwd=os.getcwd(), pack=pack): s
                for s, actor in zip(slots, actors, strict=True)}
        placed = {actor.placement.remote(s, request.trials_per_gpu): s
                  for s, actor in zip(slots, actors, strict=True)}
        display.console.print(f"starting {_slots_text(slots)} as Ray actors on {len(nodes)} "
                              "node(s)")
        idle = idle_gpus(node_gpus, spec.resources)
        if idle:
            display.console.print(f"{idle} GPU(s) stay idle: a trial takes "
                                  f"{spec.resources.label} of one node (resources.gpus)")
        return cls(ray, display, actors, runs, placed)

    def on_signal(self, signum: int, frame: Any) -> None:
        self.interrupted = True

    def watch(self, study: optuna.Study, spec: StudySpec) -> None:
        """Show progress until every run ended, a signal came, or the budget was met and a
        late worker had its grace."""
        from search.storage import budget_of, with_retry

        met_since: float | None = None
        pending = list(self.runs)
        while pending and not self.interrupted:
            done, pending = self.ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in done:
                self.codes[self.runs[ref].index] = _code(self.ray, ref)
            self.say_placements()
            counts = show(study, self.display)
            budget = with_retry(lambda: budget_of(study, spec.budget.trials),
                                what="reading the budget")
            if pending and counts.finished >= budget:
                # A worker restarted on another node late may still be starting: it would
                # only find the budget met, so it is not waited for long.
                met_since = met_since or time.monotonic()
                if time.monotonic() - met_since > FINISH_GRACE_S:
                    break
            time.sleep(POLL_S)

    def say_placements(self) -> None:
        """Where Ray placed the workers that landed since the last look; once, the ones it
        is still waiting to place."""
        ray, placed, console = self.ray, self.placed, self.display.console
        landed = ray.wait(list(placed), num_returns=len(placed), timeout=0)[0] if placed else []
        for ref in landed:
            s, where = placed.pop(ref), _value(ray, ref)
            if where is not None:
                console.print(f"Ray worker #{s.index} on node {where['node'][:8]} ({where['ip']})"
                              + (f" GPU {where['gpu']}" if where["gpu"] else "")
                              + (f", {s.ranks} ranks of" if s.ranks > 1 else ",")
                              + f" {where['threads']} thread{'s' * (where['threads'] > 1)}")
        if placed and not self.warned and time.monotonic() - self.submitted > PLACEMENT_WARNING_S:
            self.warned = True  # Ray queues an actor it cannot place yet: say so, once
            console.print("waiting for Ray to place worker(s) "
                          + ", ".join(f"#{s.index}" for s in placed.values())
                          + f" (free now: {_free_text(ray.available_resources())})")


def show(study: optuna.Study, display: Display) -> Counts:
    """The study's progress, as the workers wrote it; its counts. A storage restarting under a
    running study is waited for, as the workers do."""
    from search.storage import count_trials, with_retry

    counts = with_retry(lambda: count_trials(study), what="showing progress")
    with_retry(lambda: display.poll(study, counts), what="showing progress")
    return counts


def _slots_text(slots: list[RaySlot]) -> str:
    """`2 GPU slot(s) of 2 GPUs, 2 ranks each`: what `start` asks Ray for."""
    s = slots[0]
    text = (f"{len(slots)} GPU slot(s) of {s.num_gpus:g} GPU{'s' * (s.num_gpus > 1)}"
            if s.device == "cuda" else f"{len(slots)} CPU worker(s) of {s.num_cpus:g} CPU")
    return text + (f", {s.ranks} ranks each" if s.ranks > 1 else "")


def _free_text(free: dict[str, float]) -> str:
    return f"{free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU"


def _code(ray: Any, ref: Any) -> int | str:
    """A finished `run`'s exit code, or why its actor is gone."""
    try:
        return int(ray.get(ref))
    except Exception as e:  # RayActorError: its node died more often than it was restarted
        return f"a lost actor: {(str(e).splitlines() or [type(e).__name__])[0]}"


def _value(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except Exception:  # noqa: BLE001 - the actor died before it said; `run` reports it
        return None


def _stop(ray: Any, study: optuna.Study, actors: list[Any], running: list[Any]) -> None:
    """Ctrl-C every worker, wait for them as the local supervisor does, then queue again the
    trials they left (theirs only: other workers may run trials of this study)."""
    from optuna.trial import TrialState

    from search.storage import requeue_interrupted, with_retry

    asked = [actor.interrupt.remote() for actor in actors]
    ray.wait(running, num_returns=len(running), timeout=STOP_GRACE_S)
    ready = ray.wait(asked, num_returns=len(asked), timeout=1.0)[0]
    ours = {tuple(w) for w in (_value(ray, r) for r in ready) if w is not None}
    for actor in actors:
        ray.kill(actor)

    def requeue() -> None:
        left = {t.number for t in study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL))
            if (t.user_attrs.get("host"), t.user_attrs.get("pid")) in ours}
        requeue_interrupted(study, left)

    with_retry(requeue, what="marking the interrupted trials")
