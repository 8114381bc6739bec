"""Packed trials: up to K small models trained at once as one batched model.

Every member is built exactly as `train` builds it (same seed: same init and data order) and
keeps its own optimizer, schedule, epochs and checkpoint (in `train`'s format, so a packed
member resumes alone and the other way round); only the arithmetic is shared. The members of a
pack share the data and device (`pack_key`); they are grouped by network (`network_key`: a
space may search the hidden layers) and, within a network, in bands of batch sizes (`_bands`).
Each group's parameters are stacked on a leading axis (`_packed_stack`): where members read
the same batch (same seed, same epoch), the first layer is one wide GEMM
(``X @ [W1_1 ... W1_K]``), the later layers batched matmuls, and one backward serves all; each
member then steps with its own update rule on its own slices (`_packed_optim`).

Within a band, batch sizes may differ: every member reads the band's micro-batches (its
smallest batch size, which divides the others), and a member with a larger batch accumulates
them, weighted by size, and steps less often; so each trains as it would alone, to float
rounding. Members join between epochs only, so a stack's members stay at the same micro-step of
their epochs and their epochs end together: validation, checkpoints and `on_epoch` happen per
member there.

Stacks take turns by fair share (`_next_stack`): each epoch of a stack charges each of its
members an equal part of its seconds, and the stack whose least-charged member has been charged
least trains next (on a tie, the one with the oldest member). A member joins at the pack's
clock: the least charge of the members in it, or the charge of the last to end if that is more,
so a trial that replaces one ended after a dear epoch does not jump the queue. So every member
gets an equal share of the machine, as K trials run alone side by side would: a band of large
batches runs several epochs while a band of small ones runs one, and its trials end (and free
their slots for the sampler's next picks) at their own pace, not at the slowest band's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from trainers._checkpoint import CheckpointStore
from trainers._config import TrainConfig, config_from_dict
from trainers._data import Split
from trainers._errors import ConfigError
from trainers._models import ACTIVATIONS
from trainers._optimizers import OPTIMIZERS, current_momentum, group_lrs, set_momentum
from trainers._packed_optim import KINDS, STATE_KEYS
from trainers._packed_stack import Member, OnEpoch, Stack, stream
from trainers._results import EpochMetrics, StopTraining, TrainResult
from trainers._setup import prepare_run, resolve_device

Outcome = TrainResult | BaseException
# A band's largest batch size over its smallest (see `_bands`): 2 ran fastest on the
# fashion_mlp space in benchmarks/packing.py (1 and 4 ran slower).
BAND_SPREAD = 2


def pack_refusal(config: TrainConfig) -> str | None:
    """Why `config` cannot train in a pack (naming the setting), or None when it can."""
    m, o, d = config.model, config.optimizer, config.data
    if m.type != "mlp":
        return f"model.type {m.type!r}: only the built-in mlp is packed"
    if "batchnorm" in m.norm:
        return "model.norm batchnorm: batch statistics in train mode are not packed"
    if m.dropout > 0 and resolve_device(config.device).type == "cuda":
        return (f"model.dropout {m.dropout} on cuda: packed dropout draws its masks as the CPU "
                "does, not as CUDA's fused dropout kernel")
    if m.weights or m.freeze != "none" or m.freeze_blocks or m.unfreeze_after is not None:
        return "fine-tuning (model.weights or freezing) is not packed"
    if o.head_lr_mult != 1 or (o.head_weight_decay is not None
                               and o.head_weight_decay != o.weight_decay):
        return "optimizer.head_lr_mult / head_weight_decay: per-group settings are not packed"
    if _kind(config) is None:
        return f"optimizer {o.name!r}: its update rule has no packed form"
    if d.augment:
        return f"data.augment {list(d.augment)}: per-batch augmentation is not packed"
    if d.dataset == "image_folder" or d.num_workers is not None:
        return "streamed data (a DataLoader) is not packed"
    if config.amp and resolve_device(config.device).type == "cuda":
        return "amp: mixed precision is not packed"
    return None


def pack_key(config: TrainConfig) -> Hashable:
    """What the members of one pack share: the data, the device, CPU settings."""
    plain = config.to_dict()
    data = {k: v for k, v in plain["data"].items()
            if k not in ("num_workers", "pin_memory", "persistent_workers")}
    return (json.dumps(data, sort_keys=True, default=str),
            str(resolve_device(config.device)), config.threads, config.flush_denormal)


def network_key(config: TrainConfig) -> str:
    """What the members of one stack share besides the pack's key: the network. Its dropout
    rate only as present or not: the rate is the member's own (a space may search it)."""
    model = config.to_dict()["model"]
    model["dropout"] = model["dropout"] > 0
    return json.dumps(model, sort_keys=True, default=str)


def _kind(config: TrainConfig) -> str | None:
    """The member's update rule in `_packed_optim.KINDS`, or None outside the packed family."""
    return _rule(config)[0]


def _rule(config: TrainConfig) -> tuple[str | None, float, float]:
    """(kind, decay, eps): the member's update rule in `_packed_optim.KINDS` (None outside the
    packed family), the running average's decay of its squared gradients (Adam's beta2,
    RMSprop's alpha, Adadelta's rho) and its eps, as `build_optimizer` passes them."""
    info = OPTIMIZERS.get(config.optimizer.name)
    kwargs = info.kwargs(config.optimizer)
    eps = kwargs.get("eps", 0.0)
    if info.cls is torch.optim.SGD:
        return ("nesterov" if kwargs["nesterov"] else "sgd"), 0.0, 0.0
    if info.cls in (torch.optim.Adam, torch.optim.AdamW):
        kind = "adam" if info.cls is torch.optim.Adam else "adamw"
        return (f"{kind}_ams" if kwargs["amsgrad"] else kind), kwargs["betas"][1], eps
    if (info.cls is torch.optim.RMSprop and not kwargs.get("momentum")
            and not kwargs.get("centered")):
        return "rmsprop", kwargs["alpha"], eps
    if (info.cls is torch.optim.Adagrad and not kwargs.get("lr_decay")
            and not kwargs.get("initial_accumulator_value")):
        return "adagrad", 0.0, eps
    if info.cls is torch.optim.Adadelta:
        return "adadelta", kwargs["rho"], eps
    return None, 0.0, 0.0


class Pack:
    """Up to `capacity` members of one `pack_key`, trained together epoch by epoch (one stack
    per network and band of batch sizes)."""

    def __init__(self, capacity: int, *, spread: int = BAND_SPREAD) -> None:
        """`spread`: how many times its band's smallest batch size a member's may be and still
        share that band's micro-batches (see `_bands`); 1 packs equal batch sizes only."""
        if capacity < 1:
            raise ConfigError(f"pack capacity: expected at least 1, got {capacity!r}")
        if spread < 1:
            raise ConfigError(f"pack spread: expected at least 1, got {spread!r}")
        self.capacity = capacity
        self.spread = spread
        self.key: Hashable | None = None
        self._members: dict[int, Member] = {}
        self._next_id = 0
        self._stacks: list[Stack] = []
        self._dirty = True
        # Per network: its stacked forward and the indices of its Linear weights (per-layer
        # grad norms), from `_plan`.
        self._plans: dict[str, tuple[list[tuple[Any, ...]], list[int]]] = {}
        self._data: Any = None
        self._device = torch.device("cpu")
        self._clock = 0.0  # fair share: the charge of the last member to end (`_next_stack`)

    def __len__(self) -> int:
        return len(self._members)

    def fits(self, config: TrainConfig) -> bool:
        """Whether `add(config)` would take it: packable, room left, the pack's key."""
        if len(self) >= self.capacity or pack_refusal(config) is not None:
            return False
        return self.key is None or pack_key(config) == self.key

    def add(self, config: TrainConfig | dict[str, Any], *, on_epoch: OnEpoch | None = None,
            checkpoint: CheckpointStore | None = None) -> int:
        """Add a member built as `train` builds it (resuming from `checkpoint` like `train`);
        its id. Call between `run_until_free` calls only."""
        if isinstance(config, dict):
            config = config_from_dict(config)
        refusal = pack_refusal(config)
        if refusal is not None:
            raise ConfigError(f"cannot pack this trial: {refusal}")
        if not self.fits(config):
            raise ConfigError(f"the pack cannot take this trial ({len(self)} of {self.capacity} "
                              "members, or other data or another device than the pack's)")
        run = prepare_run(config, checkpoint)
        data = run.data
        if not isinstance(data.train, Split) or not isinstance(data.val, (Split, type(None))):
            raise ConfigError(f"data.dataset {config.data.dataset!r}: streamed data is not "
                              "packed")
        kind, decay, eps = _rule(config)
        assert kind is not None  # pack_refusal said so
        member = Member(self._next_id, config, on_epoch, checkpoint, run.model, run.optimizer,
                        kind, decay, eps, run.plan.base_lr, run.plan.schedule, run.order,
                        run.plan.steps_per_epoch, run.prepared.notes, run.started, run.rng_cpu,
                        run.rng_cuda, epoch=run.start_epoch, start_epoch=run.start_epoch,
                        history=run.history, first_loss=run.first_loss)
        member.pending = _unstacked(member)
        if self.key is None:
            self.key = pack_key(config)
            self._data, self._device = data, run.device
        member.network = network_key(config)
        member.charged = max(self._clock, min((m.charged for m in self._members.values()),
                                              default=0.0))
        if member.network not in self._plans:
            self._plans[member.network] = _plan(run.model)
        self._members[member.id] = member
        self._next_id += 1
        self._dirty = True
        return member.id

    @property
    def epoch_seconds(self) -> float:
        """The seconds of one epoch of every stack at their last epochs' pace (0 before any
        epoch): what a member's epoch takes in wall time while every stack gets its share."""
        return sum(m.share for m in self._members.values())

    def trial_seconds(self) -> float:
        """How long a member's whole run would take at the last epochs' pace (0 before any
        epoch): the longest member's epochs times `epoch_seconds`."""
        epochs = max((m.config.epochs for m in self._members.values()), default=0)
        return epochs * self.epoch_seconds

    def run_until_free(self) -> list[tuple[int, Outcome]]:
        """Train the stacks epoch by epoch, each in its turn (`_next_stack`), until at least one
        member ends; (id, outcome) of those.

        An outcome is the member's `TrainResult`, or the exception its `on_epoch` raised other
        than `StopTraining` (that member ends; the others go on)."""
        ended: list[tuple[int, Outcome]] = []
        for m in list(self._members.values()):
            if m.epoch >= m.config.epochs:  # resumed from a finished run's checkpoint
                ended.append((m.id, self._result(m, "completed",
                                                 f"trained {m.config.epochs} epochs")))
        while not ended and self._members:
            ended = self._run_epoch()
        for member_id, _ in ended:
            self._clock = max(self._clock, self._members[member_id].charged)
            del self._members[member_id]
            self._dirty = True
        if not self._members:
            self.key = None
        live = {m.network for m in self._members.values()}
        self._plans = {k: v for k, v in self._plans.items() if k in live}
        return ended

    def _restack(self) -> None:
        """One stack per network and band of batch sizes (`_bands`), members in an order that
        keeps those reading the same batches, and those stepping together with one rule, side
        by side."""
        for stack in self._stacks:
            stack.unstack(self._members)
        streams: dict[bytes, int] = {}
        networks: dict[str, list[Member]] = {}
        for m in sorted(self._members.values(), key=lambda m: m.id):
            streams.setdefault(stream(m), len(streams))
            networks.setdefault(m.network, []).append(m)
        self._stacks = []
        for network, members in networks.items():
            ops, weights = self._plans[network]
            for band in _bands(members, self.spread):
                band.sort(key=lambda m: (streams[stream(m)], KINDS.index(m.kind),
                                         m.config.batch_size, m.id))
                self._stacks.append(Stack(band, ops, weights, self._data, self._device))
        self._dirty = False

    def _next_stack(self) -> Stack:
        """The stack to train next: the one whose least-charged member has been charged least
        (ties: the one with the oldest member)."""
        return min(self._stacks, key=lambda st: (min(m.charged for m in st.members),
                                                 min(m.id for m in st.members)))

    def _run_epoch(self) -> list[tuple[int, Outcome]]:
        """One epoch of the next stack (`_next_stack`); (id, outcome) of its members that
        ended."""
        if self._dirty:
            self._restack()
        stack = self._next_stack()
        t0 = time.perf_counter()
        loss_sum, hits, norms = stack.train_epoch()
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = stack.evaluate()
        seconds = time.perf_counter() - t0
        for m in stack.members:
            m.share = seconds / len(stack.members)
            m.charged += m.share
        n = len(self._data.train)
        ended: list[tuple[int, Outcome]] = []
        for s, m in sorted(enumerate(stack.members), key=lambda item: item[1].id):
            if m.diverged:
                ended.append((m.id, self._result(m, "diverged", m.diverged)))
                continue
            m.schedule.end_epoch(val_loss[s], m.base_lr)
            _sync_groups(m)
            metrics = EpochMetrics(
                epoch=m.epoch + 1,
                train_loss=loss_sum[s] / n,
                train_accuracy=hits[s] / n,
                val_loss=val_loss[s],
                val_accuracy=val_acc[s],
                lr=m.last_lr,
                momentum=current_momentum(m.optimizer, OPTIMIZERS.get(m.config.optimizer.name)),
                grad_norms={f"linear{i + 1}": v for i, v in enumerate(norms[s])},
                epoch_seconds=seconds,
                train_seconds=train_seconds,
                samples_per_second=n / train_seconds if train_seconds > 0 else math.inf,
                group_lrs=group_lrs(m.optimizer),
                trained_parameters=sum(p.numel() for p in m.model.parameters()),
            )
            m.history.append(metrics)
            m.epoch += 1
            if m.checkpoint is not None and not m.checkpoint.save_or_warn(stack.state(m, s)):
                m.checkpoint = None  # a full disk: the run goes on without checkpoints
            outcome: Outcome | None = None
            if m.on_epoch is not None:
                try:
                    m.on_epoch(metrics)
                except StopTraining as stop:
                    outcome = self._result(m, "stopped",
                                           str(stop) or f"stopped after epoch {m.epoch}")
                except BaseException as e:  # noqa: BLE001 - that member's, handed back
                    outcome = e
            if outcome is None and m.epoch >= m.config.epochs:
                outcome = self._result(m, "completed", f"trained {m.config.epochs} epochs")
            if outcome is not None:
                ended.append((m.id, outcome))
        return ended

    def _result(self, m: Member, status: str, reason: str) -> TrainResult:
        if m.pending is not None:  # never stacked (a finished checkpoint): its own tensors
            with torch.no_grad():
                for own, t in zip(m.model.parameters(), m.pending[0], strict=True):
                    own.copy_(t)
        else:
            stack = next(st for st in self._stacks if m in st.members)
            stack.to_model(m, stack.members.index(m))
        params = sum(p.numel() for p in m.model.parameters())
        return TrainResult(
            status=status,
            reason=reason,
            history=tuple(m.history),
            seconds=time.perf_counter() - m.started,
            resumed_from_epoch=m.start_epoch,
            parameters=params,
            trained_parameters=params if m.history else 0,
            device=str(self._device),
            notes=m.notes,
            model=m.model,
        )


def _bands(members: list[Member], spread: int) -> list[list[Member]]:
    """Members grouped by batch size: a band shares micro-batches of its smallest size, so a
    larger batch joins only where it is a multiple of that and at most `spread` times it
    (accumulating many small micro-batches reads the weights once per micro-batch: cheap for
    tiny batches, dear for big ones)."""
    bands: list[list[Member]] = []
    for m in sorted(members, key=lambda m: (m.config.batch_size, m.id)):
        b = m.config.batch_size
        if bands:
            low = bands[-1][0].config.batch_size
            if b % low == 0 and b <= spread * low:
                bands[-1].append(m)
                continue
        bands.append([m])
    return bands


def _unstacked(m: Member) -> list[list[torch.Tensor]]:
    """A member's parameters and optimizer state as tensors of its own (from its model and
    torch optimizer: a fresh start or a checkpoint's)."""
    params = [p.detach().clone() for p in m.model.parameters()]
    first, second, peak = [], [], []
    for p, own in zip(m.model.parameters(), params, strict=True):
        st = m.optimizer.state.get(p, {})
        zero = torch.zeros_like(own)
        first.append(_or(st.get(STATE_KEYS[m.kind][0]), zero))
        second.append(_or(st.get(STATE_KEYS[m.kind][1]), zero))
        peak.append(_or(st.get("max_exp_avg_sq"), zero))
        if "step" in st:
            m.steps_taken = int(st["step"])
    return [params, first, second, peak]


def _sync_groups(m: Member) -> None:
    """The member's torch optimizer groups as `train` leaves them: the last lr and momentum."""
    for group in m.optimizer.param_groups:
        group["lr"] = m.last_lr * group["lr_mult"]
    if m.momentum is not None:
        set_momentum(m.optimizer, OPTIMIZERS.get(m.config.optimizer.name), m.momentum)


def _plan(model: nn.Module) -> tuple[list[tuple[Any, ...]], list[int]]:
    """The stacked forward of a built-in MLP: ("linear", w, b), ("layernorm", w, b, eps) with
    indices into its parameters, ("act", module) or ("dropout",)."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    ops: list[tuple[Any, ...]] = []
    weights: list[int] = []
    activations = tuple(ACTIVATIONS.values())
    for module in model.children():
        if isinstance(module, nn.Flatten):
            continue  # inputs arrive flat
        if isinstance(module, nn.Dropout):
            if module.p > 0:
                ops.append(("dropout",))  # at each member's own rate
            continue
        if isinstance(module, nn.Linear):
            ops.append(("linear", index[id(module.weight)], index[id(module.bias)]))
            weights.append(index[id(module.weight)])
        elif isinstance(module, nn.LayerNorm):
            ops.append(("layernorm", index[id(module.weight)], index[id(module.bias)],
                        module.eps))
        elif isinstance(module, activations):
            ops.append(("act", module))
        else:  # a bug: pack_refusal lets through only what this plan knows
            raise ConfigError(f"cannot pack a {type(module).__name__} layer")
    return ops, weights


def _or(value: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if value is None else value.detach().clone().to(default.device)
