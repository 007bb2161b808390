"""Mean squared error of a denoising decoder's prediction (epsilon, v or sample)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Denoising, ModelOutput, Progress
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Objective


@dataclass(frozen=True)
class DenoisingParams:
    weight: float = param(1.0, "multiplier of this loss in the total", ge=0)


class DenoisingLoss(nn.Module, Objective):
    """The diffusion training loss: MSE between prediction and target, over every element."""

    kind = "objective"
    name = "denoising"
    Params = DenoisingParams
    # The tiny latent-diffusion decoder's prediction and target.
    conformance = {
        "decoder.name": "latent_diffusion",
        "decoder.tiny": True,
    }
    requires = frozenset({"decoding.prediction", "decoding.target", "decoding.timesteps"})

    def __init__(self, params: DenoisingParams):
        super().__init__()
        self.params = params

    def forward(
        self, out: ModelOutput, batch: Batch, progress: Progress | None = None
    ) -> dict[str, Tensor]:
        d = out.decoding
        assert isinstance(d, Denoising)
        mse = (d.prediction.float() - d.target.float().detach()).pow(2).mean()
        return {"denoising": self.params.weight * mse}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [DenoisingLoss]
