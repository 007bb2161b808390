"""The own training losses of a tokenizer that learns alongside its decoder (SLATE's dVAE).

A decoder that owns a trainable tokenizer computes the tokenizer's losses
(`ImageTokenizer.losses`) in its forward pass and returns each in `extras` under
"tokenizer_loss.<name>" (it then provides "decoding.tokenizer_losses"); this objective adds
them to the total, each logged under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Objective
from ocl_bench.decoders.slate import TINY_SLATE_RUN

PREFIX = "tokenizer_loss."


@dataclass(frozen=True)
class TokenizerLossParams:
    weight: float = param(1.0, "multiplier of every tokenizer loss in the total", ge=0)


class TokenizerLoss(nn.Module, Objective):
    """Adds the decoder's tokenizer losses (a dVAE's pixel MSE) to the total."""

    kind = "objective"
    name = "tokenizer_loss"
    Params = TokenizerLossParams
    # SLATE's tiny decoder returns its dVAE's losses.
    conformance = TINY_SLATE_RUN
    requires = frozenset({"decoding.tokenizer_losses"})

    def __init__(self, params: TokenizerLossParams):
        super().__init__()
        self.params = params

    def forward(
        self, out: ModelOutput, batch: Batch, progress: Progress | None = None
    ) -> dict[str, Tensor]:
        # Empty in evaluation and for a frozen tokenizer: nothing to add then.
        return {
            key[len(PREFIX) :]: self.params.weight * value
            for key, value in out.decoding.extras.items()
            if key.startswith(PREFIX)
        }


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [TokenizerLoss]
