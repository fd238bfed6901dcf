"""torchrun: joining the process group and the few collectives the training loop uses (means over ranks,
the first rank that flagged a step). A single process (``WORLD_SIZE`` unset or 1) needs no group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (a copy; ``value`` itself on a single process)."""
        if self.world == 1:
            return value
        out = value.clone()
        torch.distributed.all_reduce(out)
        return out / self.world

    def first_flagged(self, step: torch.Tensor) -> int:
        """The smallest non-negative ``step`` over ranks (each rank's value is -1 when unset), or -1."""
        if self.world == 1:
            return int(step)
        unset = torch.iinfo(torch.long).max
        out = torch.where(step >= 0, step, unset)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN)
        return -1 if int(out) == unset else int(out)


def _init_distributed(device: torch.device) -> _Dist:
    """Joins the torchrun process group (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    dist = torch.distributed
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)
