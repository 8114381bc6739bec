"""Packed trials: one worker trains up to K trials of its study at once (`trainers.Pack`).

`PackRunner` is a trial runner (`search.trial._runner`) that holds several trials at once
(`--pack K`, `run.pack`). Each step fills the pack with trials asked as every trial is (under
the budget lock, the budget check and the trial's creation in one transaction), trains the pack
until members end, and tells each ended member on its own: its epochs were reported, its pruner
asked and its checkpoint written per member by the same halves of `Objective` a trial run alone
goes through, so its attrs, artifacts, retries and status are those of a trial run alone. A
member's slot is refilled at the next step (continuous batching of trials). Trials of other
networks (a space searching the hidden layers) share the pack, each network in stacks of its
own. A trial that cannot be packed (`trainers.pack_refusal`, other data or device than the
pack's, or under `auto` a large model) runs alone, and the worker says why once.

`--pack auto` packs up to `AUTO_PACK_CPU` trials of a small model on a CPU, `AUTO_PACK` on a GPU;
a trial of a model of `AUTO_MAX_PARAMETERS` or more runs alone. While the study is young the pack
holds fewer: twice the study's finished trials, at least `RAMP_START` (`PackRunner.limit`), so
the sampler learns from the first results before the pack fills with its picks (a full pack
asked before any trial ended is blind draws), and the first results come in a few trials' time,
not a full pack's.
On a GPU the pack then grows: each time a full pack has trained, its peak memory and the GPU's
utilization are read (`PackMeter`) and its capacity doubles while twice the pack still fits under
the memory margin and the GPU is not busy (`grown_capacity`, the margins of `--trials-per-gpu
auto`); the first time it may not, its size is settled. A pack that runs out of memory halves
and grows no more.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import optuna
import torch

import trainers
from search._log import logger
from search.storage import INTERRUPTED, Counts, count_trials, set_user_attrs, with_retry
from search.trial._gpu import (
    BUSY_UTILIZATION,
    MEMORY_MARGIN,
    SimulatedGpus,
    oom_from_sharing,
)
from search.trial._objective import TakenOver, is_out_of_memory
from search.trial._outcome import End, Ended, Step, TrialOutcome
from search.trial._runner import TrialRunner

if TYPE_CHECKING:
    from search.storage import DatabaseLock, FileLock, NullLock, WorkerHeartbeat
    from search.trial._objective import Objective, TrialStart

Told = tuple[Ended, "TrialOutcome | None"]  # a member told, and what the display shows of it

LOG = logger("trial")
# `--pack auto`: 32 small trials at once on a GPU (what packing gains: the packing section of
# benchmarks/README.md), and 8 on a CPU, where the pack's trials share the cores, each at about
# 1/K of its speed alone, so K sets how late the sampler hears of its picks: packs of 8 found
# better configurations sooner than packs of 32 (its search-efficiency section); a model of
# AUTO_MAX_PARAMETERS fills the machine alone.
AUTO_PACK = 32
AUTO_PACK_CPU = 8
RAMP_START = 4  # `auto`: trials in the pack before any has finished
AUTO_MAX_PARAMETERS = 1_000_000
PACK_MAX = 256


def auto_pack(config: trainers.TrainConfig, *, gpu: bool = False) -> tuple[int, str]:
    """K for `--pack auto` from a packable trial's model (1: its network runs alone) and
    whether it trains on a GPU (`AUTO_PACK`, else `AUTO_PACK_CPU`), and why."""
    data = trainers.data_for(config)
    model = trainers.prepare_model(config.model, config.init, data.input_shape,
                                   data.num_classes).model
    size = sum(p.numel() for p in model.parameters())
    if size < AUTO_MAX_PARAMETERS:
        k = AUTO_PACK if gpu else AUTO_PACK_CPU
        return k, f"--pack auto: {size:,} parameters, {k} trials at once"
    return 1, (f"--pack auto: {size:,} parameters (at least {AUTO_MAX_PARAMETERS:,}): "
               "one trial at a time")


@dataclass(frozen=True)
class PackReading:
    """A GPU as a packing worker sees it after a full pack trained."""

    members: int  # the pack's size while it trained
    own_mb: float  # the pack's peak memory (this process's), since the last reading
    others_mb: float  # held on the device by everything else (other processes, CUDA contexts)
    total_mb: float
    utilization: float | None  # percent busy; None where the driver does not say


class PackMeter(Protocol):
    def read(self, members: int) -> PackReading: ...


MB = 2**20


class CudaMeter:
    """Readings of this process's CUDA device: torch's peak (reset at each reading), the
    device's free memory, and NVML's utilization where `pynvml` is installed."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def read(self, members: int) -> PackReading:
        own = torch.cuda.max_memory_reserved(self.device) / MB
        held = torch.cuda.memory_reserved(self.device) / MB
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = (x / MB for x in torch.cuda.mem_get_info(self.device))
        try:
            utilization: float | None = float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - no pynvml, or a driver that does not say
            utilization = None
        return PackReading(members, own, max(0.0, total - free - held), total, utilization)


class SimulatedMeter:
    """`$HPSEARCH_FAKE_GPU_MEMORY`'s device, a member of the pack standing for a worker: for
    tests on machines without a GPU."""

    def __init__(self, gpus: SimulatedGpus) -> None:
        self.gpus = gpus

    def read(self, members: int) -> PackReading:
        reading = self.gpus.read({"0": members})["0"]
        own = members * self.gpus.per_worker_mb
        return PackReading(members, own, reading.memory_used_mb - own, reading.memory_total_mb,
                           reading.utilization)


def meter_for(device: str) -> PackMeter | None:
    """How a pack on `device` is measured: the simulated device where tests set one, CUDA's
    own counters on a GPU, else None (a CPU pack keeps its size)."""
    simulated = SimulatedGpus.from_env()
    if simulated is not None:
        return SimulatedMeter(simulated)
    return CudaMeter(device) if device.startswith("cuda") else None


def grown_capacity(capacity: int, reading: PackReading) -> tuple[int, str]:
    """The pack's next capacity after a full pack's `reading`, and why (empty: unchanged)."""
    if reading.members < capacity or capacity >= PACK_MAX:
        return capacity, ""  # not full (nothing learned), or as large as packs get
    busy = reading.utilization is not None and reading.utilization >= BUSY_UTILIZATION
    target = min(PACK_MAX, 2 * capacity)
    needed = reading.others_mb + reading.own_mb / reading.members * target
    seen = (f"a pack of {capacity} peaked at {reading.own_mb:,.0f} MiB, others hold "
            f"{reading.others_mb:,.0f} of {reading.total_mb:,.0f} MiB")
    if reading.utilization is not None:
        seen += f", GPU {reading.utilization:.0f}% busy"
    if busy:
        return capacity, f"--pack auto: {seen}: the pack stays at {capacity} (GPU busy)"
    if needed > MEMORY_MARGIN * reading.total_mb:
        return capacity, (f"--pack auto: {seen}: the pack stays at {capacity} ({target} would "
                          f"need {needed:,.0f} MiB, over {MEMORY_MARGIN:.0%})")
    return target, f"--pack auto: {seen}: packs of {target} now"


class PackRunner(TrialRunner):
    """A runner that holds up to K trials at once, trained together (`trainers.Pack`) between
    `step`s."""

    def __init__(self, kind: Objective, study: optuna.Study, view: optuna.Study,
                 heartbeat: WorkerHeartbeat, lock: NullLock | FileLock | DatabaseLock,
                 budget: int, capacity: int | str) -> None:
        """As `TrialRunner`; `capacity`: K, or "auto"."""
        super().__init__(kind, study, view, heartbeat, lock, budget)
        self.objective = kind
        self.capacity: int | None = None if capacity == "auto" else int(capacity)
        self.auto = capacity == "auto"
        self.grows = self.auto  # by the meter's readings, until an out-of-memory
        self.ramped = not self.auto  # `auto`: the study has finished enough trials for K
        self.meter: PackMeter | None = None  # set when `auto` takes its K
        self.pack = trainers.Pack(max(self.capacity or 1, 1))
        self.members: dict[int, TrialStart] = {}  # by the pack's member id
        self.begun: dict[int, TrialStart] = {}  # every trial asked and not yet told, by number
        self._said: set[str] = set()
        # `auto`: by network key, why its trials run alone (None: they pack)
        self._large: dict[str, str | None] = {}

    def __len__(self) -> int:
        return len(self.members)

    @property
    def busy(self) -> bool:
        return bool(self.members)

    def step(self, *, deadline: float = math.inf) -> Step:
        """Fill the pack while a new trial could end by `deadline` (the worker's timeout, on
        `time.monotonic`), train it until members end, and tell those. Where filling ended
        with a trial that ran alone and did not fail, only that trial: the worker looks at it,
        and the next step fills the pack again before it trains. (After a failure the pack
        trains first, so a broken setup's failures in a row still meet the members' results.)
        The budget's counts when no trial could start and none is training; `hpsearch stop`
        ends every member "interrupted", queued again."""
        try:
            if self.members and self.objective.stop():
                return self._interrupt_all()
            filled = self._fill(deadline)
            if isinstance(filled, Counts):
                return Step(full=filled)
            if not self.members or (filled and all(e.how is not End.FAILED for e, _ in filled)):
                return self._stepped(filled)
            return self._train(filled)
        except KeyboardInterrupt:
            self.abandon()
            raise

    def _stepped(self, told: list[Told]) -> Step:
        return self.stepped([e for e, _ in told], [s for _, s in told])

    def _train(self, told: list[Told]) -> Step:
        """Train the pack until members end; tell them after `told` (the filling's)."""
        size = len(self.pack)
        try:
            ended = self.pack.run_until_free()
        except Exception as e:  # noqa: BLE001 - training itself failed
            if (len(self.members) > 1 and is_out_of_memory(e)
                    and not oom_from_sharing(self._device())):
                return self._halve(e)  # the members are queued again
            return self._stepped(told + self._lose_all(e))  # every member is lost
        for member, outcome in ended:
            if isinstance(outcome, KeyboardInterrupt):  # Ctrl-C in a member's report
                raise outcome
            told.append(self._told(self.members.pop(member), outcome))
        if any(e.how is End.INTERRUPTED for e, _ in told):  # `hpsearch stop` met a member
            return self._interrupt_all(told)
        self._grow(size)
        return self._stepped(told)

    def _fill(self, deadline: float) -> list[Told] | Counts:
        """Ask for trials until the pack is full or a new one could not end by `deadline`; a
        trial that cannot be packed runs alone (and ends the filling: the worker looks at its
        outcome before the next). The counts when the budget leaves no room and the pack is
        empty."""
        while len(self.members) < self.limit() and self._time_for_one_more(deadline):
            asked = self.ask()
            if isinstance(asked, Counts):
                return [] if self.members else asked  # the last trials are in the pack
            begun = self.objective.prepare(asked)
            self.begun[asked.number] = begun
            refusal = self.objective.guarded(begun, lambda b=begun: self._start(b))
            if isinstance(refusal, Ended):  # failed to start (recorded), or taken over
                return [self._tell(begun, refusal)]
            assert begun.config is not None
            if refusal is None and not self.pack.fits(begun.config):
                refusal = "its data or device differ from the pack's"
            if refusal is not None:
                self._say(f"--pack: trials that cannot be packed run one at a time ({refusal})")
                return [self._alone(begun)]
            member = self.objective.guarded(begun, lambda b=begun: self.pack.add(
                b.config, on_epoch=b.report, checkpoint=b.store))
            if isinstance(member, Ended):
                return [self._tell(begun, member)]
            self.members[member] = begun
        return []

    def limit(self) -> float:
        """How many trials the pack may hold now: its capacity (unbounded until `auto` has
        taken K); under `auto` while the study is young, twice its finished trials, at least
        RAMP_START. Past K once, it stays K (no count is read again)."""
        if self.capacity is None:
            return math.inf
        if self.ramped:
            return self.capacity
        finished = with_retry(lambda: count_trials(self.study), what="counting trials").finished
        ramp = max(RAMP_START, 2 * finished)
        self.ramped = ramp >= self.capacity
        return min(ramp, self.capacity)

    def _time_for_one_more(self, deadline: float) -> bool:
        """Whether a trial started now would end by `deadline` at the pack's pace: its full
        epochs at the last epoch's time. An unpacked worker lets its one last trial overrun
        the timeout; a pack refilled to the end would overrun by K such trials at 1/K speed
        each, so near the timeout its slots drain instead."""
        now = time.monotonic()
        if now >= deadline:
            return False
        return not self.members or now + self.pack.trial_seconds() <= deadline

    def _start(self, begun: TrialStart) -> str | None:
        """Trial `begun`'s config and start attrs (`Objective.start`); why it cannot be packed
        (None if it can). `auto` judges each network by its size (`auto_pack`, once per
        network) and takes K from the first small one."""
        self.objective.start(begun)
        assert begun.config is not None
        refusal = trainers.pack_refusal(begun.config)
        if refusal is None and self.auto:
            network = trainers.network_key(begun.config)
            if network not in self._large:
                meter = meter_for(begun.device or "cpu")
                k, why = auto_pack(begun.config, gpu=meter is not None)
                self._large[network] = None if k > 1 else "--pack auto: a large model"
                if k == 1 or self.capacity is None:
                    self._say(why)  # the size of the first network packed, or a large one
                if k > 1 and self.capacity is None:
                    self.capacity = k
                    self.pack = trainers.Pack(k)
                    self.meter = meter
            refusal = self._large[network]
        return refusal

    def _grow(self, size: int) -> None:
        """After the pack trained with `size` members: `auto` doubles its capacity while the
        meter says twice the pack fits (`grown_capacity`)."""
        if not self.grows or self.meter is None or self.capacity is None or size < self.capacity:
            return  # a pack that was not full tells nothing of a fuller one: no reading
        capacity, why = grown_capacity(self.capacity, self.meter.read(size))
        if why:
            self._say(why)
        if why and capacity == self.capacity:
            self.grows = False  # settled: the GPU is full or busy at this size
        self.capacity = self.pack.capacity = capacity

    def _alone(self, begun: TrialStart) -> Told:
        """Trial `begun` trained by itself (`trainers.train`), then told."""
        result = self.objective.guarded(begun, lambda: trainers.train(
            begun.config, begun.report, begun.store))
        return self._told(begun, result)

    def _told(self, begun: TrialStart, outcome: trainers.TrainResult | BaseException | Ended
              ) -> Told:
        """Tell an ended trial: its result (COMPLETE, or PRUNED when stopped by the pruner or
        diverged), or how the error its report raised ended it (a Ctrl-C never gets here:
        `_train` raises it on)."""
        if isinstance(outcome, TakenOver):
            outcome = Ended(End.TAKEN_OVER)
        elif isinstance(outcome, Exception):
            outcome = self.objective.failed(begun, outcome)
        if not isinstance(outcome, Ended):
            outcome = self.objective.finish(begun, outcome)
        return self._tell(begun, outcome)

    def _tell(self, begun: TrialStart, ended: Ended) -> Told:
        self.begun.pop(begun.trial.number, None)
        self.members = {k: v for k, v in self.members.items() if v is not begun}
        return ended, self.tell(begun.trial, ended)

    def _lose_all(self, error: Exception) -> list[Told]:
        """Training the pack failed (out of memory, say): every member fails with the error
        (or, on a GPU shared with other workers, is queued again: `End.GPU_FULL`)."""
        device = self._device()
        members = list(self.members.values())
        self._empty(self.pack.capacity, device)
        return [self._tell(begun, self.objective.failed(begun, error)) for begun in members]

    def _device(self) -> str:
        begun = next(iter(self.members.values()), None)
        return begun.device if begun is not None and begun.device else "cpu"

    def _empty(self, capacity: int, device: str) -> None:
        """A new, empty pack; the old one's tensors go with it (and CUDA's cached blocks)."""
        self.members = {}
        self.pack = trainers.Pack(capacity)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _halve(self, error: Exception) -> Step:
        """The pack ran out of memory on a device of its own: every member ends FAIL
        "interrupted" (queued again unchanged, resuming from its checkpoint), and the worker
        goes on with packs of half the size."""
        n, device = len(self.members), self._device()
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        reason = f"out of memory in a pack of {n} on {device}: {first}"
        for begun in list(self.begun.values()):
            self._tell(begun, self._interrupted(begun, {"oom_pack": reason}))
        self.capacity, self.grows = max(1, n // 2), False
        self._empty(self.capacity, device)
        self.queue_again()
        LOG.info(f"--pack: {reason}; its {n} trials are queued again and this worker goes on "
                 f"with packs of {self.capacity}")
        return Step()

    def _interrupt_all(self, told: list[Told] | None = None) -> Step:
        """`hpsearch stop`: every trial asked and not told ends FAIL "interrupted" (queued
        again: each resumes from its last epoch checkpoint); the worker stops."""
        told = list(told or [])
        for begun in list(self.begun.values()):
            told.append(self._tell(begun, self._interrupted(begun)))
        self._empty(self.pack.capacity, self._device())
        return self._stepped(told)

    def _interrupted(self, begun: TrialStart, extra: dict[str, str] | None = None) -> Ended:
        """Mark trial `begun` interrupted (with `extra` attrs): it ends INTERRUPTED."""
        if extra:
            attrs = {"ended": INTERRUPTED, **extra}
            with_retry(lambda: set_user_attrs(begun.trial, attrs), what="marking the trial")
        try:
            self.objective.interrupted(begun)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told already (an interruption during its tell)
        return Ended(End.INTERRUPTED)

    def abandon(self) -> None:
        """Ctrl-C or SIGTERM: as every runner's, each member marked interrupted first."""
        for begun in list(self.begun.values()):
            try:
                self.objective.interrupted(begun)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        self.begun = {}
        self._empty(self.pack.capacity, self._device())
        super().abandon()

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            LOG.info(line)
