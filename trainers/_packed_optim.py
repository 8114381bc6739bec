"""Optimizer steps for a pack: each member's own step on its slices of the stacked tensors.

Each member steps with torch's fused kernels (`torch._fused_sgd_`, `_fused_adam_`,
`_fused_adamw_`: what `torch.optim` runs with ``fused=True``), one call per member and parameter
group, with the member's own hyperparameters. A member's slices are small enough to stay in
cache through the one fused pass, where an update over the whole stack at once makes several
passes over tensors K times larger (several times slower for Adam on the CPU). RMSprop, Adagrad and
Adadelta, which have no fused kernel on every device, step with `torch.optim`'s own arithmetic
over foreach lists, also one member at a time. Tests compare each rule against `torch.optim`
on the same member (tests/trainers_tests/test_packed.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The packable family: every built-in optimizer. "sgd" covers plain SGD with or without momentum;
# the Adam variants keep amsgrad's running maximum of the second moment.
KINDS = ("sgd", "nesterov", "adam", "adam_ams", "adamw", "adamw_ams", "rmsprop", "adagrad",
         "adadelta")
# Where each kind's `first` and `second` tensors live in `torch.optim`'s state (None: unused).
STATE_KEYS: dict[str, tuple[str | None, str | None]] = {
    "sgd": ("momentum_buffer", None), "nesterov": ("momentum_buffer", None),
    **dict.fromkeys(("adam", "adam_ams", "adamw", "adamw_ams"), ("exp_avg", "exp_avg_sq")),
    "rmsprop": (None, "square_avg"), "adagrad": (None, "sum"),
    "adadelta": ("acc_delta", "square_avg"),
}


@dataclass(frozen=True)
class Hypers:
    """One member's hyperparameters for one step."""

    lr: float
    momentum: float  # SGD momentum, or Adam's beta1 (both may be cycled by onecycle)
    decay: float  # of the squared gradients' running average: Adam's beta2, RMSprop's alpha,
    # Adadelta's rho
    eps: float
    # The step count after this step (1 on the first), for Adam's bias correction: a 0-dim
    # tensor on the parameters' device, where the fused kernel reads it (a count made into a
    # tensor each step would be a host-to-device copy, which waits for the GPU, per step).
    step: torch.Tensor


def member_update(kind: str, groups: Sequence[tuple[float, Sequence[int]]],
                  params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  first: Sequence[torch.Tensor], second: Sequence[torch.Tensor],
                  peak: Sequence[torch.Tensor], h: Hypers) -> None:
    """One optimizer step of one member, in place.

    `groups`: (weight decay, indices into the parameter lists) per parameter group, as
    `build_optimizer` groups them. `first`: SGD's momentum buffer, Adam's exp_avg or Adadelta's
    acc_delta; `second`: Adam's exp_avg_sq, RMSprop's and Adadelta's square_avg or Adagrad's
    sum; `peak`: amsgrad's max_exp_avg_sq. A momentum buffer that starts at zero
    gives torch's first step exactly (SGD clones the gradient into it: 0 * momentum + d is d).
    """
    for weight_decay, idx in groups:
        p = [params[i] for i in idx]
        g = [grads[i] for i in idx]
        if kind in ("sgd", "nesterov"):
            torch._fused_sgd_(
                p, g, [first[i] for i in idx] if h.momentum != 0 else [],
                weight_decay=weight_decay, momentum=h.momentum, lr=h.lr, dampening=0.0,
                nesterov=kind == "nesterov", maximize=False, is_first_step=False,
                grad_scale=None, found_inf=None)
            continue
        if kind in ("rmsprop", "adagrad", "adadelta"):
            _squared_rule(kind, weight_decay, p, g, [first[i] for i in idx],
                          [second[i] for i in idx], h)
            continue
        ams = kind.endswith("_ams")
        fused = torch._fused_adamw_ if kind.startswith("adamw") else torch._fused_adam_
        fused(p, g, [first[i] for i in idx], [second[i] for i in idx],
              [peak[i] for i in idx] if ams else [], [h.step] * len(idx),
              lr=h.lr, beta1=h.momentum, beta2=h.decay, weight_decay=weight_decay, eps=h.eps,
              amsgrad=ams, maximize=False, grad_scale=None, found_inf=None)


def _squared_rule(kind: str, weight_decay: float, p: list[torch.Tensor], g: list[torch.Tensor],
                  first: list[torch.Tensor], second: list[torch.Tensor], h: Hypers) -> None:
    """RMSprop (no momentum, not centered), Adagrad (no lr decay, accumulator from zero) and
    Adadelta as `torch.optim` computes them: the same operations in the same order."""
    if weight_decay != 0:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    if kind == "adagrad":
        torch._foreach_addcmul_(second, g, g, value=1)
        std = torch._foreach_sqrt(second)
        torch._foreach_add_(std, h.eps)
        torch._foreach_addcdiv_(p, g, std, value=-h.lr)
        return
    torch._foreach_mul_(second, h.decay)
    torch._foreach_addcmul_(second, g, g, value=1 - h.decay)
    if kind == "rmsprop":
        avg = torch._foreach_sqrt(second)
        torch._foreach_add_(avg, h.eps)
        torch._foreach_addcdiv_(p, g, avg, value=-h.lr)
        return
    std = torch._foreach_add(second, h.eps)  # adadelta
    torch._foreach_sqrt_(std)
    delta = torch._foreach_add(first, h.eps)
    torch._foreach_sqrt_(delta)
    torch._foreach_div_(delta, std)
    torch._foreach_mul_(delta, g)
    torch._foreach_mul_(first, h.decay)
    torch._foreach_addcmul_(first, delta, delta, value=1 - h.decay)
    torch._foreach_add_(p, delta, alpha=-h.lr)


def clip_(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ of one member's gradients."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    torch._foreach_mul_(list(grads), torch.clamp(max_norm / (norm + 1e-6), max=1.0))
