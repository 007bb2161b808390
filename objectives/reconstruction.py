"""Mean squared error between the decoder's reconstruction and its target."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress, ReconstructionOutput
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Objective


@dataclass(frozen=True)
class ReconstructionParams:
    weight: float = param(1.0, "multiplier of this loss in the total", ge=0)


class Reconstruction(nn.Module, Objective):
    """MSE on whatever the decoder reconstructs (pixels or encoder features)."""

    kind = "objective"
    name = "reconstruction"
    Params = ReconstructionParams
    # The suite's tiny base run trains with this loss.
    conformance = {}
    requires = frozenset({"decoding.reconstruction", "decoding.target"})

    def __init__(self, params: ReconstructionParams):
        super().__init__()
        self.params = params

    def forward(self, out: ModelOutput, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        d = out.decoding
        assert isinstance(d, ReconstructionOutput)
        mse = (d.reconstruction.float() - d.target.float().detach()).pow(2).mean()
        return {"reconstruction": self.params.weight * mse}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [Reconstruction]
