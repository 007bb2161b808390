"""Datasets for a run: building the plugin for a split and a resumable batch order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from ocl_bench.run.config import PluginChoice


def make_dataset(choice: PluginChoice, split: str) -> Any:
    return choice.cls(choice.params, split)


def evaluation_dataset(choice: PluginChoice, split: str) -> Any:
    """What evaluation tasks read of `split`. A dataset plugin whose split is synthetic names
    its real counterpart with a classmethod `for_evaluation(params, split)` (the generated
    dataset: the source's real train images, which a property probe fits on)."""
    return choice.cls.for_evaluation(choice.params, split)


class StepBatchSampler(Sampler[list[int]]):
    """Batches of indices that depend only on (seed, step), so a resumed run sees the
    same data as an uninterrupted one. Each epoch is a fresh permutation.

    With `rank`/`world` set, each process takes its slice of the global batch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def indices(self, step: int) -> list[int]:
        first = step * self.batch_size
        out: list[int] = []
        perm_epoch, perm = -1, None
        for pos in range(first, first + self.batch_size):
            epoch, offset = divmod(pos, self.size)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self._permutation(epoch)
            assert perm is not None
            out.append(int(perm[offset]))
        local = self.batch_size // self.world
        return out[self.rank * local : (self.rank + 1) * local]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
