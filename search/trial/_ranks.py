"""A trial of several processes (``resources: {gpus: N}`` or ``{processes: N}``): N ranks of
one process group, started by the worker for the trial and ended together.

The worker's side is `run_ranks`: it starts the N rank processes (fresh ones, as torchrun
does; forked from a server process that imported torch once, so a rank is ready in tens of
milliseconds where importing torch took a second), serves rank 0's reports (each answered
with the trial's verdict: go on, pruned, or stopped by `hpsearch stop`), and watches every
rank. A rank that raises ends the trial with
its rank and message (`RankFailed`); a rank that dies without a word (killed by a signal, the
kernel's out-of-memory killer) ends it at once as lost (`RankLost`: queued again to resume from
its checkpoint, like a dead worker's trial). Either way the other ranks are killed at once,
so none is left waiting in a collective. A port taken between its choice and rank 0's bind
is retried on another.

Each rank's side is `Rank`: the environment torchrun would give (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the default process group initialized (NCCL on GPUs,
gloo on the CPU), and a small gloo group of hpsearch's own over which rank 0 hands every rank
the one verdict it got for an epoch (`Rank.decide`), so every rank stops at the same epoch.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from search._log import logger, print_records, printer_level
from search._process import die_with_parent, free_port

# A verdict on an epoch: None (go on), or ("pruned" | "stop", why).
Verdict = tuple[str, str] | None
PORT_TRIES = 3  # a port clash is retried this many times, each on a new free port
EXIT_PORT_CLASH = 3  # a rank's exit code when its process group could not bind the port
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL for the ranks left when a trial ends
LOG = logger("trial")


class RankFailed(Exception):
    """A rank raised (or exited without a result): the trial fails with this reason."""

    def __init__(self, reason: str, traceback_text: str = "") -> None:
        super().__init__(reason)
        self.traceback = traceback_text


class RankLost(Exception):  # noqa: N818 - a state of the trial, as a dead worker's
    """A rank died without a word (a signal, the out-of-memory killer): the trial is lost, and
    resumes from its checkpoint when it is queued again."""


@dataclass(frozen=True)
class Placement:
    """Where a trial's ranks run: a device each, CPU threads each, the collective backend."""

    devices: tuple[str, ...]  # per rank: "cuda:0", "cuda:1", or "cpu"
    threads: int | None = None

    @property
    def width(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        """NCCL where each rank has a GPU of its own, gloo otherwise (and on the CPU)."""
        own = all(d.startswith("cuda") for d in self.devices) and len(set(self.devices)) == \
            len(self.devices)
        return "nccl" if own else "gloo"

    @classmethod
    def of(cls, width: int, device: str, threads: int | None, *, own_gpus: bool) -> Placement:
        """``gpus: N`` (`own_gpus`): rank r on cuda:r of the worker's visible GPUs;
        ``processes: N``: every rank on the worker's `device`."""
        if own_gpus:
            return cls(tuple(f"cuda:{r}" for r in range(width)), threads)
        return cls((device,) * width, threads)


def run_ranks(target: Callable[[Rank, Any], Any], payload: Any, placement: Placement, *,
              on_report: Callable[[Any], Verdict], label: str = "trial",
              preload: tuple[str, ...] = ()) -> Any:
    """Run ``target(rank, payload)`` in each of `placement.width` new processes; what rank 0
    returned. Rank 0's reports (`Rank.decide`) are answered with ``on_report(report)``.
    `preload`: modules the ranks import (the user's trainer), imported once by the fork
    server as it starts. RankFailed, RankLost as the module says; a KeyboardInterrupt here
    ends every rank."""
    port = 0
    context = _rank_context(preload)
    for attempt in range(1, PORT_TRIES + 1):
        port = free_port()
        try:
            return _Group(context, target, payload, placement, port, on_report).serve()
        except _PortClash:
            if attempt < PORT_TRIES:
                LOG.info(f"{label}: port {port} was taken as the ranks started; trying another")
    raise RankFailed(f"{label}: rank 0 could not bind a port for its process group in "
                     f"{PORT_TRIES} tries (the last {port})")


class _PortClash(Exception):
    pass


class _Group:
    """One start of a trial's ranks, served until they end (`serve`)."""

    def __init__(self, context: Any, target: Callable[[Rank, Any], Any], payload: Any,
                 placement: Placement, port: int, on_report: Callable[[Any], Verdict]) -> None:
        self.on_report = on_report
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for rank in range(placement.width):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_rank_main, name=f"hpsearch-rank-{rank}",
                                   args=(rank, port, placement, theirs, target, payload,
                                         printer_level()))
            self.conns.append(mine)
            self.procs.append(proc)
        self.result: tuple[Any] | None = None  # (rank 0's return value,) once it came
        self.error: RankFailed | None = None
        self.clash = False

    def serve(self) -> Any:
        try:
            for proc in self.procs:
                proc.start()
            self._watch()
        finally:
            self._end()
        if self.clash:
            raise _PortClash
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RankFailed("rank 0 ended without a result")
        return self.result[0]

    def _watch(self) -> None:
        """Serve the ranks until each exited, or one failed or died (the rest are ended)."""
        exited: set[int] = set()
        while len(exited) < len(self.procs):
            sentinels = {p.sentinel: r for r, p in enumerate(self.procs) if r not in exited}
            talking = [c for c in self.conns if not c.closed]
            ready = wait([*talking, *sentinels], timeout=5.0)
            for conn in [c for c in ready if c in talking]:
                self._message(self.conns.index(conn), conn)
            if self.error is not None or self.clash:
                return
            for handle in [h for h in ready if h in sentinels]:
                rank = sentinels[handle]
                self._drain(rank)
                self.procs[rank].join(timeout=5)  # its sentinel closed: reaped at once
                code = self.procs[rank].exitcode
                exited.add(rank)
                if self.error is not None or self.clash:
                    return
                if code != 0:
                    how = (f"killed by signal {signal.Signals(-code).name}" if code < 0
                           else f"exit code {code}")
                    raise RankLost(f"rank {rank} of {len(self.procs)} died ({how})")

    def _drain(self, rank: int) -> None:
        """What an exited rank said before it went (its error, its result)."""
        conn = self.conns[rank]
        with contextlib.suppress(OSError):
            while not conn.closed and conn.poll():
                self._message(rank, conn)

    def _message(self, rank: int, conn: Connection) -> None:
        try:
            kind, *body = conn.recv()
        except (EOFError, OSError):
            conn.close()  # its end closed: the sentinel says how it exited
            return
        if kind == "report":
            conn.send(self.on_report(body[0]))
        elif kind == "result":
            self.result = (body[0],)
        elif kind == "error" and self.error is None:
            self.error = RankFailed(f"rank {rank}: {body[0]}", body[1])
        elif kind == "port":
            self.clash = True

    def _end(self) -> None:
        """Every rank still running is ended: SIGTERM, SIGKILL after a grace period."""
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            if not conn.closed:
                conn.close()


# Imported once by the server the ranks are forked from: torch (a second a rank, the bulk of a
# short trial's start) and DDP's compiler stack (another second at a rank's first DDP).
PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo",
           "search.trial._ranks"]


@functools.cache
def _rank_context(preload: tuple[str, ...] = ()) -> Any:
    """Where ranks start: a fork server of this worker's (Linux, macOS) that never touches
    CUDA, so each rank starts as a fresh process would, with torch (and `preload`: the user's
    trainer module, Transformers or Lightning with it) already imported; spawn elsewhere. The
    server starts with the first trial's ranks, so its preload is the first call's; one that
    fails to import is left to the ranks to import (and to report). The server ends with the
    worker, and its ranks with it (PR_SET_PDEATHSIG)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, *preload])
    return context


class Rank:
    """A rank's place in its trial and the one verdict every rank acts on (`decide`)."""

    def __init__(self, rank: int, placement: Placement, conn: Connection, control: Any) -> None:
        self.rank = rank
        self.world_size = placement.width
        self.device = placement.devices[rank]
        self.threads = placement.threads
        self._conn = conn
        self._control = control  # hpsearch's own gloo group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def decide(self, report: Any) -> Verdict:
        """Every rank calls it at the same point (an epoch's end): rank 0 sends `report` to
        the worker and gets its verdict, which every rank returns."""
        import torch.distributed as dist

        verdict = [None]
        if self.is_main:
            self._conn.send(("report", report))
            verdict = [self._conn.recv()]
        dist.broadcast_object_list(verdict, src=0, group=self._control)
        return verdict[0]



def _rank_main(rank: int, port: int, placement: Placement, conn: Connection,
               target: Callable[[Rank, Any], Any], payload: Any, printing: int | None) -> None:
    """A rank process: its environment and process groups, then `target`; its exit code
    says how it ended (0 done, 1 raised, EXIT_PORT_CLASH, 130 interrupted). hpsearch's
    warnings (`Trial.report`'s) are printed from the level the worker prints them from."""
    die_with_parent(signal.SIGKILL)  # no rank trains on alone when its worker dies
    if printing is not None:  # a fresh process: the worker's handlers are not here
        print_records(printing)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(placement.width),
                      LOCAL_WORLD_SIZE=str(placement.width), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if placement.threads:
        os.environ["OMP_NUM_THREADS"] = str(placement.threads)
    code = 0
    try:
        control = _join(rank, placement)
        if control is None:
            conn.send(("port",))
            code = EXIT_PORT_CLASH
        else:
            result = target(Rank(rank, placement, conn, control), payload)
            if rank == 0:
                conn.send(("result", result))
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 - the rank's error is the trial's reason
        message = next((line for line in str(e).splitlines() if line.strip()), "")
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {message}" if message
                       else type(e).__name__, "".join(traceback.format_exception(e))[-8000:]))
        code = 1
    finally:
        _leave()
        conn.close()
    os._exit(code)  # not the interpreter's exit: no atexit of torch's waiting on peers


def _join(rank: int, placement: Placement) -> Any:
    """The default process group and hpsearch's own gloo group; None when the port was
    taken (rank 0 could not bind it)."""
    import torch
    import torch.distributed as dist

    if placement.threads:
        torch.set_num_threads(placement.threads)
    device = placement.devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group(placement.backend, rank=rank, world_size=placement.width)
    except Exception as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            return None
        raise
    return dist.new_group(backend="gloo")


def _leave() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------ what a trial's ranks run


@dataclass(frozen=True)
class TrainJob:
    """The built-in trainer's trial, for each of its ranks."""

    config: dict[str, Any]  # `TrainConfig.to_dict()`
    checkpoint_dir: str | None


def train_rank(rank: Rank, job: TrainJob) -> Any:
    """`trainers.train` as rank `rank` of a data-parallel run; rank 0's result (its model
    left out: the worker needs the metrics)."""
    import dataclasses

    import trainers

    config = trainers.config_from_dict(job.config).replace(
        device=rank.device, **({"threads": rank.threads} if rank.threads else {}))
    store = trainers.CheckpointStore(job.checkpoint_dir) if job.checkpoint_dir else None

    def on_epoch(metrics: Any) -> None:
        verdict = rank.decide(metrics)
        if verdict is not None:
            raise trainers.StopTraining(verdict[1])

    result = trainers.train(config, on_epoch, store,
                            shard=trainers.Shard(rank.rank, rank.world_size))
    return dataclasses.replace(result, model=None) if rank.is_main else None


@dataclass(frozen=True)
class FitJob:
    """A user's `fit(params, trial)` trial, for each of its ranks."""

    function: str  # its import path, module:function
    number: int
    study_name: str
    params: dict[str, Any]
    epochs: int
    checkpoint_dir: str | None
    final: bool = False
    seed: int | None = None


def fit_rank(rank: Rank, job: FitJob) -> Any:
    """The user's function as rank `rank`: what rank 0's returned (None when pruned or
    stopped; the worker's own record of the reports says which)."""
    from pathlib import Path

    import trainers
    from search.trial._api import Pruned, StopRequested, Trial

    fit = trainers.load_plugin(job.function, "hpsearch.trainers", "trainer")

    def on_report(epoch: int, values: dict[str, float]) -> str | None:
        verdict = rank.decide((epoch, values))
        if verdict is not None and verdict[0] == "stop":
            raise StopRequested(verdict[1])
        return verdict[1] if verdict is not None else None

    user = Trial(number=job.number, study_name=job.study_name, params=job.params,
                 device=rank.device, threads=rank.threads, epochs=job.epochs,
                 checkpoint_dir=Path(job.checkpoint_dir) if job.checkpoint_dir else None,
                 final=job.final, seed=job.seed, on_report=on_report, rank=rank.rank,
                 world_size=rank.world_size, writes_history=False)
    try:
        returned = fit(dict(job.params), user)
    except Pruned:
        return None
    return returned if rank.is_main else None
