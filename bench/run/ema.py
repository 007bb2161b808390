"""Exponential moving average of the trainable weights (train.ema_decay).

Updated after every optimiser step as ema <- decay * ema + (1 - decay) * weights, from a
copy of the initial weights (no decay warm-up). Only trainable parameters are averaged:
frozen ones never move, and buffers (normalisation statistics, fixed grids) are taken
from the live model when the averaged weights are used. Evaluation (`ocl-bench eval`,
the end-of-training evaluation and the validation probe while training) uses the
averaged weights whenever train.ema_decay > 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ocl_bench.api.errors import DataError


class WeightEMA:
    """The averaged copy of a model's trainable parameters, by parameter name."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def _live(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        return [(self.shadow[name], params[name]) for name in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, live in self._live(model):
            avg.lerp_(live.detach().to(avg.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:5]
            unexpected = sorted(state.keys() - self.shadow.keys())[:5]
            raise DataError(
                f"averaged weights {where} do not match the model: missing {missing}, "
                f"unexpected {unexpected}"
            )
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """The model carries the averaged weights inside the block, its own (bitwise) after."""
        pairs = self._live(model)
        saved = [live.detach().clone() for _, live in pairs]
        with torch.no_grad():
            for avg, live in pairs:
                live.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, live), value in zip(pairs, saved):
                    live.copy_(value)


def apply_averaged(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Put averaged weights (an EMA file's contents) into `model`'s parameters."""
    params = dict(model.named_parameters())
    unknown = sorted(k for k in state if k not in params)
    missing = sorted(k for k, p in params.items() if p.requires_grad and k not in state)
    if unknown or missing:
        raise DataError(
            f"averaged weights {where} do not match the model: missing keys {missing[:5]}, "
            f"unexpected keys {unknown[:5]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


__all__ = ["WeightEMA", "apply_averaged"]
