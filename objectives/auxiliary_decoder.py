"""A second decoder's reconstruction loss beside the model's own (thesis Table 5.4).

The thesis (5.5.3) adds "another decoder to the second stage": SPOT's autoregressive
decoder, "whose loss on the second stage was added to help the model in image
segmentation", beside the MAGE decoder's token loss ("Second Stage + Spot Decoder").
A composed model has one decoder (the one evaluation, generation and the decoder masks
use), so the auxiliary one lives in this objective: `connect(model)` builds it from the
decoder registry with the model's sizes before the optimiser exists, so it trains (its
parameters are in the optimiser through the objective) and is checkpointed with the
objectives' state; evaluation never sees it.

Which slots it decodes (`slots`): "attention" (default) reads the slot-attention slots
that `mask_pooling` keeps beside its pooled ones (`PooledSlots.attention_slots`; the
grouping's own slots for plain slot attention). Those are differentiable into slot
attention, which hard-pooled slots are not, so this is the path by which the loss can
"help ... segmentation". "grouping" reads the slots the model's decoder is conditioned on.
The loss is the MSE of its reconstruction against its (detached) target, times `weight`:
for `spot_ar`, the encoder's visible-pass tokens (`Features.targets`), i.e. SPOT's L_REC.

Under DDP the objective is not wrapped, so its decoder's gradients are not averaged
across processes: use it on one process.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress, ReconstructionOutput
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import build_params, param
from ocl_bench.api.plugin import Objective
from ocl_bench.encoders.vit import TINY_VIT_ENCODER


@dataclass(frozen=True)
class AuxiliaryDecoderParams:
    decoder: dict[str, Any] = param(
        {"name": "spot_ar"},
        "the auxiliary decoder: {name = 'spot_ar', ...its params}"
        " (objectives.auxiliary_decoder.decoder.KEY=VALUE)",
    )
    slots: Literal["attention", "grouping"] = param(
        "attention",
        "'attention': the slot-attention slots (mask_pooling keeps them); 'grouping': the"
        " slots the model's decoder reads",
    )
    weight: float = param(1.0, "multiplier of its reconstruction MSE in the total", ge=0)


class AuxiliaryDecoder(nn.Module, Objective):
    """The reconstruction loss of a second decoder (SPOT's) on the model's slots."""

    kind = "objective"
    name = "auxiliary_decoder"
    Params = AuxiliaryDecoderParams
    # A 1-block spot_ar beside the main decoder, over the tiny ViT's features.
    conformance = {
        **TINY_VIT_ENCODER,
        "objectives.auxiliary_decoder.decoder": {
            "name": "spot_ar",
            "num_layers": 1,
            "num_heads": 2,
        },
    }
    requires = frozenset({"slots.slots"})

    def __init__(self, params: AuxiliaryDecoderParams):
        super().__init__()
        self.params = params
        values = dict(params.decoder)
        name = values.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError("objectives.auxiliary_decoder.decoder: give its name (spot_ar)")
        from ocl_bench.run.registry import registry

        self.decoder_cls = registry().get("decoder", name)
        if not issubclass(self.decoder_cls.output, ReconstructionOutput):
            raise ConfigError(
                f"objectives.auxiliary_decoder: decoder '{name}' does not reconstruct"
                f" ({self.decoder_cls.output.__name__}); use a reconstruction decoder (spot_ar)"
            )
        self.decoder_params = build_params(
            self.decoder_cls.Params, values, "objectives.auxiliary_decoder.decoder"
        )
        self.decoder: nn.Module | None = None

    def connect(self, model: nn.Module) -> None:
        dims = copy.copy(getattr(model, "dims", None))
        if dims is None:
            raise ConfigError("objective 'auxiliary_decoder' needs a model built by build_model")
        grouping_params = getattr(getattr(model, "grouping", None), "params", None)
        if self.params.slots == "attention" and hasattr(grouping_params, "slot_dim"):
            dims.slot_dim = grouping_params.slot_dim
        try:
            self.decoder = self.decoder_cls(self.decoder_params, dims)
        except ValueError as err:
            raise ConfigError(f"objectives.auxiliary_decoder.decoder: {err}") from None

    def forward(self, out: ModelOutput, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        if self.decoder is None:
            raise ConfigError("objective 'auxiliary_decoder' is not connected to a model")
        slots = out.slots
        if self.params.slots == "attention":
            own = getattr(slots, "attention_slots", None)
            if own is not None:
                slots = replace(slots, slots=own)
        if self.decoder_cls.requires & {"features.targets"} and out.features.targets is None:
            raise ConfigError(
                "objectives.auxiliary_decoder: the encoder gives no features.targets to reconstruct"
            )
        decoded = self.decoder(slots, out.features, batch)
        mse = (decoded.reconstruction.float() - decoded.target.float().detach()).pow(2).mean()
        return {"auxiliary_reconstruction": self.params.weight * mse}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [AuxiliaryDecoder]


__all__ = ["AuxiliaryDecoder", "AuxiliaryDecoderParams"]
