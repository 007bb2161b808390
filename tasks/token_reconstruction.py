"""Masked-token reconstruction loss on the evaluation split (thesis Tables 5.2-5.5).

The thesis' "Reconstruction Loss" column is its training criterion measured on COCO
validation images: MAGE's cross-entropy over the masked token positions (eq. 4.3, with
MAGE's label smoothing 0.1). The label smoothing is part of what it reports: the
fine-tuned encoder of Table 5.2 reaches 1.0, which is the smallest value a 0.1-smoothed
cross-entropy over a 1024-code vocabulary can take (the entropy of the smoothed target,
about 1.02), while a plain cross-entropy would go to 0.

What is averaged, per image: the cross-entropy (label smoothing `label_smoothing`) of the
decoder's logits over the codebook against the tokenizer's ids, over that image's masked
positions (TokenState MASKED or DROPPED, i.e. `TokenPrediction.predicted`), with masks
drawn by the encoder's own schedule (MAGE: one truncated-Gaussian ratio per batch, mean
0.55, in [0.5, 1]) under the evaluation seed; then the mean over images.
`reconstruction_loss` is that value; `masked_token_ce` is the same without label
smoothing and `masked_token_accuracy` the share of masked positions whose argmax is the
true id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ocl_bench.api.contracts import TokenPrediction
from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.tasking import EvalContext, Metric, Task, TaskResult, per_image_record
from ocl_bench.decoders.mage import TINY_MAGE_RUN


@dataclass(frozen=True)
class TokenReconstructionParams:
    label_smoothing: float = param(
        0.1, "label smoothing of reconstruction_loss (MAGE's training criterion: 0.1)", ge=0, le=1
    )


class TokenReconstruction(Task):
    """Masked-token cross-entropy of a token-prediction decoder on the evaluation images."""

    metrics = (
        Metric(
            "reconstruction_loss",
            "the training loss (label smoothing included) on masked tokens",
            higher_is_better=False,
            per_image=True,
            headline=True,
        ),
        Metric(
            "masked_token_ce",
            "cross-entropy on masked tokens, no label smoothing",
            higher_is_better=False,
            per_image=True,
            headline=True,
        ),
        Metric(
            "masked_token_accuracy",
            "share of masked tokens predicted exactly",
            unit="%",
            scale=100.0,
            per_image=True,
        ),
    )
    name = "token_reconstruction"
    Params = TokenReconstructionParams
    # Scores the tiny MAGE decoder's predictions.
    conformance = TINY_MAGE_RUN
    requires = frozenset({"decoding.logits", "decoding.target_ids", "decoding.predicted"})

    def __init__(self, params: TokenReconstructionParams):
        self.params = params

    def evaluate(self, ctx: EvalContext) -> TaskResult:
        values: dict[str, list[torch.Tensor]] = {
            "reconstruction_loss": [],
            "masked_token_ce": [],
            "masked_token_accuracy": [],
        }
        positions = 0
        for _batch, out in ctx.predictions(desc="token reconstruction"):
            d = out.decoding
            if not isinstance(d, TokenPrediction):
                raise DataError(f"{type(d).__name__} has no token logits to score")
            logits, target = d.logits.float(), d.target_ids
            chosen = d.predicted.bool().float()
            count = chosen.sum(1)
            flat_logits, flat_target = logits.flatten(0, 1), target.flatten()
            smoothed = F.cross_entropy(
                flat_logits,
                flat_target,
                label_smoothing=self.params.label_smoothing,
                reduction="none",
            ).view_as(chosen)
            plain = F.cross_entropy(flat_logits, flat_target, reduction="none").view_as(chosen)
            right = (logits.argmax(-1) == target).float()
            # an image with no masked position has no loss (NaN: left out of the mean)
            for key, per_position in (
                ("reconstruction_loss", smoothed),
                ("masked_token_ce", plain),
                ("masked_token_accuracy", right),
            ):
                values[key].append(((per_position * chosen).sum(1) / count).double().cpu())
            positions += int(count.sum())
        records = [
            per_image_record(
                self.name,
                metric,
                chunks,
                protocol={
                    "averaged": "per image: mean over its masked (MASKED or DROPPED) "
                    "positions; then the mean over images",
                    "label_smoothing": self.params.label_smoothing
                    if metric == "reconstruction_loss"
                    else 0.0,
                    "masks": "the encoder's eval-time masking under the eval seed",
                },
            )
            for metric, chunks in values.items()
        ]
        return TaskResult(
            records,
            {
                "images": sum(len(c) for c in values["masked_token_ce"]),
                "masked_positions": positions,
            },
        )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [TokenReconstruction]


__all__ = ["TokenReconstruction", "TokenReconstructionParams"]
