"""Data-parallel training of one run over several processes: `Shard`, a process's place in it.

`train(config, ..., shard=Shard(rank, world_size))` runs in each of the run's processes, the
default `torch.distributed` process group initialized by the caller (NCCL on GPUs, gloo on the
CPU). Every rank draws the same shuffled order and the same augmentation (one seed), takes its
slice of each global batch (`config.batch_size` is the global batch), and DDP averages the
gradients; each rank's loss is scaled so that the average is the global batch's mean. So a
run over N ranks follows the one-process run at the same batch size up to the order of float
additions, except where a layer depends on the batch it sees: batch norm normalizes each rank's
slice by its own statistics (no SyncBatchNorm), and dropout draws the same masks on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world_size` processes training one run data-parallel."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} ranks")

    @property
    def is_main(self) -> bool:
        """Rank 0: it validates, reports and writes the checkpoints."""
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's rows of a global batch of `n`: contiguous, the sizes differing by at
        most one (as `torch.tensor_split`)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` in DistributedDataParallel over the default process group (rank 0's
        parameters and buffers broadcast to every rank as it is wrapped)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over every rank (in place; returned)."""
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def from_main(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's `values` on every rank (validation runs on rank 0 alone)."""
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()


def trained_ids(model: nn.Module) -> frozenset[int]:
    """The parameters a run trains now: DDP is wrapped again when unfreezing changes them."""
    return frozenset(id(p) for p in model.parameters() if p.requires_grad)
