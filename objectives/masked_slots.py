"""Masked-slot training (thesis stage 3, section 4.1.3) over a slot library.

"The methodology involves creating two possible occasions with a probability p during the
training phase. One occasion is to keep the classic training method described in the
second stage. The second occasion is to hide all the latent tokens and some slots from
the decoder, and also replace the remaining unhidden slots with the closest centroids from
the K-means algorithm. We add a cross-entropy loss which tries to predict the K-means ids
of the hidden slots."

Per training step, with probability `keep_prob` (p) the loss is the stage-2 one: MAGE's
label-smoothed cross-entropy over the masked token positions (`token_weight`,
`label_smoothing`). Otherwise:

1. targets: the id of each slot's nearest centroid in the library (Euclidean);
2. per image, h ~ Uniform{1..K} slots are hidden (a random subset; the thesis does not
   say how many, this covers every count up to "generate all slots"): they enter the
   decoder as one learned mask-slot vector; the others as their nearest centroids;
3. every grid token is hidden: the MAGE decoder runs on the encoder's pass over an
   all-[MASK] grid (each position filled with the class token, as MAGE does for masked
   positions), with those slots appended;
4. the decoder's last-block output at each slot position -> its final LayerNorm -> a
   linear head over the C centroids (owned here); cross-entropy on the hidden slots.

The MAGE decoder exposes only its grid outputs, so the slot positions' output is read
with a forward hook on its last block (no copy of its code here). The objective builds
its head and mask-slot vector in `connect(model)` (sizes from the model), before the
optimiser exists. `library` names a slot-library file or a stage-2 run directory; from a
run directory the library `k<centroids>` is used (made with `ocl-bench slot-library`
when missing) and, with `start_from_run`, the model starts from that run's weights
(stage 3 continues stage 2; a resumed run then continues from its own checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress, TokenPrediction
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import ConformanceRun, Objective
from ocl_bench.decoders.mage import TINY_MAGE_RUN
from ocl_bench.run.slot_library import SlotLibrary, library_file, load_library


@dataclass(frozen=True)
class MaskedSlotsParams:
    library: str = param(
        "",
        "slot-library file, or a stage-2 run directory (its slot_library/k<centroids>, made"
        " when missing); in a grid, '@PRESET' trains that preset first",
    )
    centroids: int = param(4096, "library size K when `library` is a run directory", ge=1)
    start_from_run: bool = param(
        True, "when `library` is a run directory, start from that run's trained weights"
    )
    keep_prob: float = param(
        0.5, "probability p that a step keeps the stage-2 token loss (thesis: 'p')", ge=0, le=1
    )
    token_weight: float = param(1.0, "weight of the stage-2 masked-token cross-entropy", ge=0)
    label_smoothing: float = param(0.1, "label smoothing of the token loss (MAGE: 0.1)", ge=0, le=1)
    slot_weight: float = param(1.0, "weight of the hidden slots' centroid-id cross-entropy", ge=0)


class MaskedSlots(nn.Module, Objective):
    """Stage-2 token loss with prob. p, else predict hidden slots' k-means ids from centroids."""

    kind = "objective"
    name = "masked_slots"
    Params = MaskedSlotsParams
    # A 4-centroid library made from an untrained run of the same tiny MAGE model.
    conformance = {
        **TINY_MAGE_RUN,
        "objectives": {"masked_slots": {"library": ConformanceRun(TINY_MAGE_RUN), "centroids": 4}},
    }
    requires = frozenset(
        {"decoding.logits", "decoding.target_ids", "decoding.predicted", "slots.slots"}
    )

    def __init__(self, params: MaskedSlotsParams, library: SlotLibrary | None = None):
        super().__init__()
        self.params = params
        self.run_dir: Path | None = None
        if library is None:
            library = self._open_library(params)
        self.register_buffer("centroids", library.centroids.float(), persistent=False)
        self.provenance = library.provenance
        self.head: nn.Linear | None = None
        self.mask_slot: nn.Parameter | None = None
        self._model: list[nn.Module] = []

    def _open_library(self, p: MaskedSlotsParams) -> SlotLibrary:
        if not p.library:
            raise ConfigError(
                "objectives.masked_slots.library: give a slot-library file or the run directory"
                " of a trained stage-2 model"
            )
        if p.library.startswith("@"):
            raise ConfigError(
                f"objectives.masked_slots.library = '{p.library}' names the run of preset"
                f" '{p.library[1:]}', which only `ocl-bench grid` trains first; run this config"
                " through a grid or give a run directory"
            )
        where = Path(p.library)
        if (where / "config.toml").is_file():
            self.run_dir = where
            if not library_file(where, p.centroids).is_file():
                from ocl_bench.run.slot_library import build_library

                return build_library(where, p.centroids)
            return load_library(where, p.centroids)
        return load_library(where)

    def connect(self, model: nn.Module) -> None:
        """Build the head (decoder width -> C) and the mask-slot vector from the model's
        sizes; with start_from_run, load the stage-2 run's weights into the model."""
        decoder = getattr(model, "decoder", None)
        needed = ("decode", "decoder_blocks", "decoder_norm", "encoder", "vocab", "num_tokens")
        if decoder is None or not all(hasattr(decoder, a) for a in needed):
            raise ConfigError(
                "objective 'masked_slots' needs the MAGE decoder (decoder.name=mage): it hides"
                " tokens and slots from that decoder"
            )
        dims = getattr(model, "dims", None)
        slot_dim = getattr(dims, "slot_dim", None)
        if slot_dim != self.centroids.shape[1]:
            raise ConfigError(
                f"objectives.masked_slots: the library's centroids have dimension"
                f" {self.centroids.shape[1]}, this model's slots {slot_dim}"
            )
        width = int(decoder.decoder_norm.normalized_shape[0])
        self.head = nn.Linear(width, self.centroids.shape[0])
        self.mask_slot = nn.Parameter(torch.randn(slot_dim) * 0.02)
        if self.run_dir is not None and self.params.start_from_run:
            self._start_from(model, self.run_dir)
        self._model = [model]  # a plain reference: the model is not this objective's child

    @staticmethod
    def _start_from(model: nn.Module, run_dir: Path) -> None:
        from ocl_bench.run.evaluate import load_run

        _, trained, _ = load_run(run_dir)
        try:
            model.load_state_dict(trained.state_dict(), strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ConfigError(
                f"objectives.masked_slots: the model differs from the run {run_dir} it should"
                f" start from ({first})"
            ) from None

    def masked_slot_inputs(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(decoder slots float[B,K,D], hidden bool[B,K], target centroid ids long[B,K]).

        Visible slots become their nearest centroid, hidden ones the mask-slot vector; each
        image hides a uniform 1..K of its slots (a random subset, from torch's RNG)."""
        if self.mask_slot is None:
            raise ConfigError("objective 'masked_slots' is not connected to a model")
        b, k, _ = slots.shape
        from ocl_bench.run.slot_library import nearest_centroids

        ids = nearest_centroids(slots.detach(), self.centroids)
        count = torch.randint(1, k + 1, (b, 1), device=slots.device)
        rank = torch.rand(b, k, device=slots.device).argsort(1).argsort(1)
        hidden = rank < count
        inputs = torch.where(
            hidden.unsqueeze(-1),
            self.mask_slot.to(slots.dtype).expand(b, k, -1),
            self.centroids[ids].to(slots.dtype),
        )
        return inputs, hidden, ids

    def slot_logits(self, inputs: Tensor) -> Tensor:
        """float[B,K,C]: the decoder's output at each slot position over an all-[MASK] grid."""
        decoder = self._model[0].decoder
        b = inputs.shape[0]
        grid = torch.full(
            (b, decoder.num_tokens), decoder.vocab.mask_id, dtype=torch.long, device=inputs.device
        )
        encoded = decoder.encoder.encode_ids(grid)
        hidden_grid = torch.ones_like(grid, dtype=torch.bool)
        seen: list[Tensor] = []
        hook = decoder.decoder_blocks[-1].register_forward_hook(
            lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            decoder.decode(encoded, None, hidden_grid, inputs)
        finally:
            hook.remove()
        states = decoder.decoder_norm(seen[-1][:, -inputs.shape[1] :])
        assert self.head is not None
        return self.head(states)

    def forward(self, out: ModelOutput, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        p = self.params
        d = out.decoding
        assert isinstance(d, TokenPrediction)
        zero = d.logits.new_zeros(())
        if float(torch.rand(())) < p.keep_prob:
            chosen = d.predicted.bool()
            ce = F.cross_entropy(
                d.logits[chosen].float(), d.target_ids[chosen], label_smoothing=p.label_smoothing
            )
            return {"masked_tokens_ce": p.token_weight * ce, "masked_slots_ce": zero}
        inputs, hidden, ids = self.masked_slot_inputs(out.slots.slots)
        logits = self.slot_logits(inputs)
        ce = F.cross_entropy(logits[hidden].float(), ids[hidden])
        return {"masked_tokens_ce": zero, "masked_slots_ce": p.slot_weight * ce}

    def describe(self) -> dict[str, Any]:
        return {"library": self.provenance}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [MaskedSlots]


__all__ = ["MaskedSlots", "MaskedSlotsParams"]
