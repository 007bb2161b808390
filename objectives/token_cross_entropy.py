"""Cross-entropy of a token-prediction decoder on the positions it predicts (MAGE, SLATE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress, TokenPrediction
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Objective
from ocl_bench.decoders.slate import TINY_SLATE_RUN


@dataclass(frozen=True)
class TokenCrossEntropyParams:
    weight: float = param(1.0, "multiplier of this loss in the total", ge=0)
    label_smoothing: float = param(0.0, "label smoothing of the targets (MAGE: 0.1)", ge=0, le=1)
    reduction: Literal["mean", "sum_per_image"] = param(
        "mean",
        "mean over the predicted positions of the batch (MAGE), or summed over each image's"
        " predicted positions and averaged over images (SLATE)",
    )


class TokenCrossEntropy(nn.Module, Objective):
    """Cross-entropy over the vocabulary, averaged over the predicted positions only."""

    kind = "objective"
    name = "token_cross_entropy"
    Params = TokenCrossEntropyParams
    # SLATE's tiny decoder predicts its dVAE's ids.
    conformance = TINY_SLATE_RUN
    requires = frozenset({"decoding.logits", "decoding.target_ids", "decoding.predicted"})

    def __init__(self, params: TokenCrossEntropyParams):
        super().__init__()
        self.params = params

    def forward(
        self, out: ModelOutput, batch: Batch, progress: Progress | None = None
    ) -> dict[str, Tensor]:
        d = out.decoding
        assert isinstance(d, TokenPrediction)
        chosen = d.predicted.bool()
        # Mean over predicted positions of the whole batch, as MAGE's masked loss: images
        # with more masked tokens weigh more, every predicted token counts once.
        loss = F.cross_entropy(
            d.logits[chosen].float(),
            d.target_ids[chosen],
            label_smoothing=self.params.label_smoothing,
            reduction="mean" if self.params.reduction == "mean" else "sum",
        )
        if self.params.reduction == "sum_per_image":
            loss = loss / d.logits.shape[0]
        return {"token_cross_entropy": self.params.weight * loss}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [TokenCrossEntropy]
