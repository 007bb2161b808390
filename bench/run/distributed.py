"""torchrun support: one process per device, gloo on CPU and nccl on GPU.

Outside torchrun (no WORLD_SIZE in the environment) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World:
    """The process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    return World(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device."""
    world = current()
    if world.size == 1:
        return world, device
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself without torchrun)."""
    if not dist.is_initialized():
        return float(value)
    t = value.detach().reshape(1).clone().float()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
