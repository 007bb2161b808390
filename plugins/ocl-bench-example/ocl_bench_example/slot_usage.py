"""How many slots a model actually uses per image, and how peaked its masks are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.tasking import EvalContext, Metric, MetricRecord, Task, TaskResult


@dataclass(frozen=True)
class SlotUsageParams:
    masks: str = param("attn", "which masks: 'attn' or 'decoder'")
    min_share: float = param(
        0.01, "a slot counts as used when it wins this share of pixels", ge=0, le=1
    )


class SlotUsage(Task):
    """Mean number of used slots per image and mean mask confidence (no labels needed)."""

    metrics = (
        Metric(
            "slots_used", "slots holding at least min_share of an image's pixels", headline=True
        ),
        Metric("confidence", "mean over pixels of the largest slot probability"),
    )
    scores_masks = True
    name = "slot_usage"
    Params = SlotUsageParams
    # The conformance suite's tiny base run fits it as it is.
    conformance = {}
    requires = frozenset({"slots.attn"})

    def __init__(self, params: SlotUsageParams):
        self.params = params

    def evaluate(self, ctx: EvalContext) -> TaskResult:
        used, confidence, images = [], [], 0
        for _batch, out in ctx.predictions(desc="slot usage"):
            soft = out.masks(self.params.masks).float().flatten(2)  # [B,K,P]
            winners = soft.argmax(1)
            share = torch.stack([(winners == k).float().mean(1) for k in range(soft.shape[1])], 1)
            used.append((share >= self.params.min_share).sum(1).float())
            confidence.append(soft.max(1).values.mean(1))
            images += soft.shape[0]
        return TaskResult(
            [
                MetricRecord(
                    self.name,
                    "slots_used",
                    float(torch.cat(used).mean()),
                    self.params.masks,
                    None,
                    images,
                ),
                MetricRecord(
                    self.name,
                    "confidence",
                    float(torch.cat(confidence).mean()),
                    self.params.masks,
                    None,
                    images,
                ),
            ]
        )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SlotUsage]
