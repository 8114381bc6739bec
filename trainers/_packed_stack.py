"""The stacked half of a pack (`trainers._packed`): one band's members, their parameters and
optimizer state stacked on a leading axis, trained one micro-batch at a time.

A micro-batch is the band's smallest batch size; a member with a larger batch accumulates the
micro-batches of its batch, each weighted by its share of the batch, and steps once its batch is
complete: the gradient of its batch's mean loss, as `train` takes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers._checkpoint import CheckpointStore
from trainers._config import TrainConfig
from trainers._loop import DIVERGENCE_CHECK_EVERY, GRAD_NORM_EVERY, _divergence
from trainers._packed_optim import STATE_KEYS, Hypers, clip_, member_update
from trainers._results import EpochMetrics
from trainers._schedules import Schedule
from trainers._setup import checkpoint_state

OnEpoch = Callable[[EpochMetrics], None]
# Beyond this many groups of members reading different batches, one gather and a batched
# matmul beat a wide GEMM per group.
WIDE_GROUPS_MAX = 4


@dataclass(eq=False)
class Member:
    """One trial of a pack: what `train` keeps in its locals, kept across the pack's epochs."""

    id: int
    config: TrainConfig
    on_epoch: OnEpoch | None
    checkpoint: CheckpointStore | None
    model: nn.Module  # the member's own network: checkpoints and the result go through it
    optimizer: torch.optim.Optimizer  # holds param groups and, at checkpoints, the state
    kind: str  # its update rule (`_packed_optim.KINDS`)
    decay: float  # the rule's squared-gradient decay and eps (`Hypers`)
    eps: float
    base_lr: float
    schedule: Schedule
    order: torch.Generator
    steps_per_epoch: int
    notes: tuple[str, ...]
    started: float
    rng_cpu: torch.Tensor  # the global RNG state `train` would checkpoint (nothing draws later)
    rng_cuda: torch.Tensor | None = None
    epoch: int = 0  # epochs completed
    start_epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    first_loss: float | None = None
    steps_taken: int = 0  # optimizer steps: torch.optim's state["step"]
    last_lr: float = math.nan
    momentum: float | None = None  # the cycled momentum (or beta1) of the last step
    diverged: str = ""
    pending: list[list[torch.Tensor]] | None = None  # params, first, second, peak: unstacked
    network: str = ""  # `network_key`: members of one stack share it
    # Fair share (`Pack._next_stack`): the seconds of its stack's epochs charged to it (each
    # epoch's split evenly among the stack's members), and its part of the last one.
    charged: float = 0.0
    share: float = 0.0
    # Dropout: the member's stand-in for the global RNG `train` draws its masks from (its state
    # after the init, `rng_cpu`), and the masks of its current step, one per dropout layer.
    rng: torch.Generator | None = None
    masks: list[torch.Tensor] = field(default_factory=list)

    def generator(self) -> torch.Generator:
        if self.rng is None:
            self.rng = torch.Generator()
            self.rng.set_state(self.rng_cpu)
        return self.rng

    @property
    def uses_momentum(self) -> bool:
        return self.config.optimizer.momentum != 0 or self.schedule.cycles_momentum


class Stack:
    """Members of one band of batch sizes, their tensors stacked: one forward and backward per
    micro-batch (the band's smallest batch size) for all of them."""

    def __init__(self, members: list[Member], ops: list[tuple[Any, ...]], weights: list[int],
                 data: Any, device: torch.device) -> None:
        self.members, self.ops, self.weights = members, ops, weights
        self.data, self.device = data, device
        self.dropout = any(op[0] == "dropout" for op in ops)
        stacks = []
        for which in range(4):
            per_param = zip(*(m.pending[which] for m in members), strict=True)  # type: ignore[index]
            stacks.append([torch.stack(ts) for ts in per_param])
        self.params, self.first, self.second, self.peak = stacks
        for p in self.params:
            p.requires_grad_(True)
        # Each member's slices, and its parameter groups as `build_optimizer` makes them:
        # weight decay on matrices only unless decay_all (nanoGPT's rule).
        self.views = [[[t[s] for t in ts] for ts in (
            [p.detach() for p in self.params], self.first, self.second, self.peak)]
            for s in range(len(members))]
        matrices = [i for i, p in enumerate(self.params) if p.dim() >= 3]
        vectors = [i for i, p in enumerate(self.params) if p.dim() < 3]
        self.groups: list[list[tuple[float, list[int]]]] = []
        for m in members:
            wd = m.config.optimizer.weight_decay
            if wd == 0 or m.config.optimizer.decay_all:
                self.groups.append([(wd, matrices + vectors)])
            else:
                self.groups.append([(wd, matrices), (0.0, vectors)])
        # Each member's optimizer step count on the device, for the Adam kinds' bias correction,
        # and device copies of the member indices the grad-norm samples use: built from host
        # values once, not each step (a host-to-device copy waits for the GPU's queue).
        self.steps = torch.tensor([float(m.steps_taken) for m in members], device=device)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        for m in members:
            m.pending = None

    def unstack(self, keep: dict[int, Member]) -> None:
        """Give each member still in the pack its own copy of its tensors."""
        for s, m in enumerate(self.members):
            if m.id in keep:
                m.pending = [[t[s].detach().clone() for t in ts]
                             for ts in (self.params, self.first, self.second, self.peak)]

    def forward(self, xs: list[tuple[int, int, torch.Tensor]],
                drop: list[tuple[int, int | None] | None] | None = None) -> torch.Tensor:
        """Logits [K, batch, classes] of every member; `xs`: (first, end, inputs) per group of
        members reading the same inputs; `drop`, in training: each member's (offset of this
        micro-batch in its step's batch, that batch's size where this micro-batch starts the
        step, else None), or None once it diverged, for its dropout masks (`_masks`). Without
        it, no dropout (eval)."""
        h: torch.Tensor | None = None
        layer = 0
        for op in self.ops:
            if op[0] == "linear":
                w, b = self.params[op[1]], self.params[op[2]]
                if h is None:
                    h = first_layer(xs, w, b)
                else:
                    h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            elif op[0] == "layernorm":
                assert h is not None
                w, b = self.params[op[1]], self.params[op[2]]
                h = F.layer_norm(h, h.shape[-1:], eps=op[3]) * w.unsqueeze(1) + b.unsqueeze(1)
            elif op[0] == "dropout":
                if drop is not None:
                    assert h is not None
                    h = h * self._masks(layer, h.shape[1], h.shape[2], drop)
                    layer += 1
            else:
                h = op[1](h)
        assert h is not None
        return h

    def _masks(self, layer: int, size: int, width: int,
               drop: list[tuple[int, int | None] | None]) -> torch.Tensor:
        """The scaled dropout masks [K, size, width] of this micro-batch at dropout `layer`, each
        member's at its own rate p.

        `train` draws a mask for its whole batch at each dropout layer, in forward order, from
        the global RNG (`empty_like(h).bernoulli_(1 - p).div_(1 - p)`, then `h * mask`: the
        CPU's dropout). Each member draws the same from its own generator, at the micro-batch
        that starts its step, and each micro-batch takes its rows."""
        parts = []
        for m, where in zip(self.members, drop, strict=True):
            if where is None:  # diverged: its loss no longer counts
                parts.append(torch.ones(size, width, device=self.device))
                continue
            offset, rows = where
            if rows is not None:
                if layer == 0:
                    m.masks = []
                p = m.config.model.dropout
                mask = torch.empty(rows, width, device=self.device)
                m.masks.append(mask.bernoulli_(1 - p, generator=m.generator()).div_(1 - p))
            parts.append(m.masks[layer][offset:offset + size])
        return torch.stack(parts)

    def train_epoch(self) -> tuple[list[float], list[int], list[list[float]]]:
        """One epoch of every member: (summed train loss, correct, mean grad norms) of each."""
        stack, data, device = self.members, self.data, self.device
        k, n = len(stack), len(data.train)
        micro = min(m.config.batch_size for m in stack)
        n_micro = math.ceil(n / micro)
        every = [m.config.batch_size // micro for m in stack]  # micro-batches per step
        # Members reading the same order this epoch (same seed and epoch) share the batches.
        groups: list[tuple[int, int, torch.Tensor]] = []
        streams = [stream(m) for m in stack]
        for s, m in enumerate(stack):
            perm = torch.randperm(n, generator=m.order)  # every member draws, as alone
            if groups and streams[s] == streams[groups[-1][0]]:
                groups[-1] = (groups[-1][0], s + 1, groups[-1][2])
            else:
                groups.append((s, s + 1, perm.to(device)))
        x_all = data.train.x.reshape(n, -1)
        loss_sum = torch.zeros(k, device=device)
        hits = torch.zeros(k, dtype=torch.long, device=device)
        batch_loss = torch.zeros(k, device=device)
        norm_sum = torch.zeros(k, len(self.weights), device=device)
        norm_samples = [0] * k
        live = [not m.diverged for m in stack]
        scale_key: tuple[float, ...] = ()
        scale = loss_sum
        for j in range(n_micro):
            start, size = j * micro, min(micro, n - j * micro)
            xs, ys = [], []
            for a, end, perm in groups:
                idx = perm[start:start + size]
                xs.append((a, end, x_all.index_select(0, idx)))
                ys.append(data.train.y.index_select(0, idx).expand(end - a, size))
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
            # Each member's gradient is that of its batch's mean loss: every micro-batch's
            # summed loss over the batch's size (the last batch holds the remainder).
            sizes = tuple(
                (n - m.config.batch_size * (m.steps_per_epoch - 1)
                 if j // e == m.steps_per_epoch - 1 else m.config.batch_size) if ok else math.inf
                for m, e, ok in zip(stack, every, live, strict=True))
            if sizes != scale_key:
                scale_key = sizes
                scale = 1.0 / torch.tensor(sizes, device=device)
            drop = [((j % e) * micro, int(b) if j % e == 0 else None) if ok else None
                    for e, b, ok in zip(every, sizes, live, strict=True)] if self.dropout else None
            logits = self.forward(xs, drop)
            ce = F.cross_entropy(logits.reshape(k * size, -1), y.reshape(-1),
                                 reduction="none").view(k, size)
            ce_sum = ce.sum(1)
            (ce_sum * scale).sum().backward()
            with torch.no_grad():
                loss_sum += ce_sum
                batch_loss += ce_sum * scale
                hits += (logits.argmax(2) == y).sum(1)
                last = j == n_micro - 1
                stepping = [s for s in range(k) if last or (j + 1) % every[s] == 0]
                self._step(stepping, [j // every[s] for s in range(k)], live, batch_loss,
                           norm_sum, norm_samples)
        norms = [(norm_sum[s] / max(1, norm_samples[s])).tolist() for s in range(k)]
        return loss_sum.tolist(), hits.tolist(), norms

    def _step(self, stepping: list[int], batch: list[int], live: list[bool],
              batch_loss: torch.Tensor, norm_sum: torch.Tensor, norm_samples: list[int]
              ) -> None:
        """Optimizer steps of the members whose batch is complete."""
        if not stepping:
            return
        stack = self.members
        for s in stepping:
            m = stack[s]
            t = m.epoch * m.steps_per_epoch + batch[s]
            m.last_lr = m.base_lr * m.schedule.factor(t)
            m.momentum = m.schedule.momentum(t)
        active = [s for s in stepping if live[s]]
        # Every member's gradient views in one call per parameter, not one per member and
        # parameter (a tenth of a large pack's host time per step).
        by_param = [p.grad.unbind(0) for p in self.params]
        grads = {s: [g[s] for g in by_param] for s in active}
        for s in active:
            m = stack[s]
            if m.config.max_grad_norm is not None:
                clip_(grads[s], m.config.max_grad_norm)
        sample = [s for s in active if batch[s] % GRAD_NORM_EVERY == 0]
        if sample and self.weights:
            # Sampled, as `train` samples them: the per-layer trend, not every step.
            idx = self._index(sample)
            layer = torch.stack([self.params[w].grad.index_select(0, idx).flatten(1).norm(dim=1)
                                 for w in self.weights], dim=1)
            norm_sum.index_add_(0, idx, layer)
            for s in sample:
                norm_samples[s] += 1
        for a, end in ranges([s for s in active if stack[s].kind.startswith("adam")]):
            self.steps[a:end].add_(1)
        for s in active:
            m = stack[s]
            m.steps_taken += 1
            params, first, second, peak = self.views[s]
            member_update(m.kind, self.groups[s], params, grads[s],
                          first, second, peak,
                          Hypers(lr=m.last_lr, momentum=momentum_of(m, m.momentum),
                                 decay=m.decay, eps=m.eps, step=self.steps[s]))
        checks = [s for s in active if batch[s] % DIVERGENCE_CHECK_EVERY == 0
                  or batch[s] == stack[s].steps_per_epoch - 1]
        if checks:
            losses = batch_loss.tolist()  # one read for all (indexing by a list would copy
            values = [losses[s] for s in checks]  # the list to the device first)
            for s, value in zip(checks, values, strict=True):
                m = stack[s]
                m.first_loss = value if m.first_loss is None else m.first_loss
                reason = _divergence(value, m.first_loss, m.config.divergence_factor)
                if reason:
                    m.diverged = f"{reason} at epoch {m.epoch + 1}, step {batch[s] + 1}"
                    live[s] = False
        for p in self.params:
            if len(stepping) == len(stack):
                p.grad = None  # the next backward writes, rather than adds to, a gradient
            else:
                for a, end in ranges(stepping):
                    p.grad[a:end].zero_()
        for a, end in ranges(stepping):
            batch_loss[a:end].zero_()

    def _index(self, members: list[int]) -> torch.Tensor:
        """`members` as an index tensor on the device (cached: the patterns repeat)."""
        key = tuple(members)
        if key not in self._indices:
            self._indices[key] = torch.tensor(members, device=self.device)
        return self._indices[key]

    def evaluate(self) -> tuple[list[float], list[float]]:
        split = self.data.val
        k = len(self.members)
        if split is None or len(split) == 0:
            return [math.nan] * k, [math.nan] * k
        batch = self.members[0].config.eval_batch_size
        loss = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        x_all = split.x.reshape(len(split), -1)
        with torch.no_grad():
            for start in range(0, len(split), batch):
                x, y = x_all[start:start + batch], split.y[start:start + batch]
                logits = self.forward([(0, k, x)])
                loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                        y.repeat(k), reduction="none").view(k, -1).sum(1)
                correct += (logits.argmax(2) == y).sum(1)
        n = len(split)
        return (loss / n).tolist(), (correct.double() / n).tolist()

    def to_model(self, m: Member, s: int) -> None:
        with torch.no_grad():
            for own, stacked in zip(m.model.parameters(), self.params, strict=True):
                own.copy_(stacked[s])

    def state(self, m: Member, s: int) -> dict[str, Any]:
        """The checkpoint `train` would write for this member: it resumes packed or alone."""
        self.to_model(m, s)
        opt = m.optimizer
        opt.state.clear()
        for i, p in enumerate(m.model.parameters()):
            first, second = STATE_KEYS[m.kind]
            if m.kind in ("sgd", "nesterov"):
                if m.uses_momentum:
                    opt.state[p] = {first: self.first[i][s].clone()}
                continue
            st = {"step": torch.tensor(float(m.steps_taken))}
            if first is not None:
                st[first] = self.first[i][s].clone()
            st[second] = self.second[i][s].clone()
            if m.kind.endswith("_ams"):
                st["max_exp_avg_sq"] = self.peak[i][s].clone()
            opt.state[p] = st
        state = checkpoint_state(m.config, m.model, opt, m.schedule, m.order, m.history,
                                 m.first_loss, self.device)
        opt.state.clear()
        state["rng_cpu"] = m.rng.get_state() if m.rng is not None else m.rng_cpu
        if m.rng_cuda is not None:
            state["rng_cuda"] = m.rng_cuda
        return state


def first_layer(xs: list[tuple[int, int, torch.Tensor]], w: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    out_features, in_features = w.shape[1:]
    if len(xs) > WIDE_GROUPS_MAX:
        x = torch.cat([x.unsqueeze(0).expand(end - a, *x.shape) for a, end, x in xs])
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    pieces = []
    for a, end, x in xs:
        n = end - a
        # One GEMM for the group: the batch against every member's weights side by side.
        wide = torch.addmm(b[a:end].reshape(1, -1), x,
                           w[a:end].reshape(n * out_features, in_features).t())
        pieces.append(wide.view(x.shape[0], n, out_features).transpose(0, 1))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def stream(m: Member) -> bytes:
    """Members whose data-order generators agree read the same batches this epoch."""
    return bytes(m.order.get_state().numpy())


def momentum_of(m: Member, cycled: float | None) -> float:
    if cycled is not None:
        return cycled
    o = m.config.optimizer
    return o.momentum if m.kind in ("sgd", "nesterov") else o.beta1


def ranges(positions: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering sorted `positions`."""
    out: list[list[int]] = []
    for s in positions:
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return [(a, b) for a, b in out]
