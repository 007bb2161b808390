"""torchrun support: one process per device, gloo on CPU and nccl on GPU.

Outside torchrun (no WORLD_SIZE in the environment) everything here is a no-op. A submitit
job's tasks join the same way: the job exports the variables torchrun would set
(ocl_bench.run.cluster).

Stop requests let a scheduler's signal (preemption, a time limit) end training at a step
boundary with a checkpoint: a process that takes them (take_stops, on every rank alike)
agrees with the other ranks after each step whether any was asked to stop (one all-reduce
of one number), and train() then saves and raises Preempted on every rank. A process that
does not take them (torchrun, the CLI, local grids) runs no extra collective.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


def gather(value: Any) -> list[Any]:
    """`value` of every rank, in rank order, on every rank ([value] without a group)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (`value` itself without a group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Preempted(BaseException):  # noqa: N818 - a stop, like KeyboardInterrupt, not an error
    """Raised out of train() on every rank once a stop request is agreed on: the checkpoint
    of `step` is saved. Not an Exception, so that code recording failures lets it pass."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step} on request (checkpoint saved)")
        self.step = step


_TAKES_STOPS = threading.Event()  # this process's training loops act on stop requests
_STOP_ASKED = threading.Event()  # a stop was asked for (from a signal handler)
_IN_LOOP = threading.Event()  # a training loop is running and will see the request


def take_stops() -> None:
    """Make training loops in this process act on stop requests (call on every rank)."""
    _TAKES_STOPS.set()


def ask_stop() -> bool:
    """Ask the training loop to checkpoint and stop after its current step; whether one is
    running to do so (safe in a signal handler: it only sets flags)."""
    _STOP_ASKED.set()
    return _IN_LOOP.is_set() and _TAKES_STOPS.is_set()


def stop_asked() -> bool:
    """Whether this process was asked to stop (by ask_stop)."""
    return _STOP_ASKED.is_set()


@contextmanager
def stop_point() -> Iterator[None]:
    """While the training loop runs: a stop asked for now is left to it."""
    _IN_LOOP.set()
    try:
        yield
    finally:
        _IN_LOOP.clear()


def stop_agreed(device: torch.device) -> bool:
    """Whether any rank was asked to stop, the same answer on every rank; False at no cost
    in a process that does not take stops."""
    if not _TAKES_STOPS.is_set():
        return False
    return any_true(_STOP_ASKED.is_set(), device)
