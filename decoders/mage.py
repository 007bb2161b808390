"""MAGE's decoder and tied MLM head, conditioned on slots (the thesis' stage 2), with
MaskGIT iterative decoding for generation.

MAGE (github.com/LTH14/mage, models_mage.py forward_decoder, gen_img_uncond.py), from
../shared/reference/spot-and-mage.md sections h and i:

- `decoder_embed` maps the encoder's masked pass (Features.masked_tokens: class token,
  then the kept positions) to the decoder width; every masked position, dropped or fed
  as [MASK], is filled with the embedded class-token output (`pad_with_cls_token`);
  `decoder_pos_embed_learned` is added; 8 MAGE blocks with 16 heads; `decoder_norm`;
- the MLM head: fc -> GELU -> LayerNorm (eps 1e-5) -> logits against the encoder's
  word embeddings, *detached* (tied, no gradient through the tie), + `bias` over the
  whole vocabulary; TokenPrediction keeps the codebook columns of the grid positions,
  and `predicted` = the masked positions, so `token_cross_entropy` with
  label_smoothing 0.1 is MAGE's loss.

Slots (thesis 4.1.2: "we combine both the masked pooled slots and the encoded patches
of the first branch and pass it through the decoder"): `slot_proj` (Linear slot_dim ->
decoder width) turns the K slots into K extra tokens appended after the position
embedding, so every decoder block attends jointly over the 1+N grid tokens and the
slots; only the grid tokens go to the head. The last block's attention from each grid
token to the slot tokens, summed over heads and renormalised over slots, is the
decoder's mask ([B,N,K]), the decoder-side masks of the thesis' mBO columns.

Generation (thesis 4.1.4 and 5.3: start from no visible token and only the slots):
MaskGIT decoding as gen_img_uncond.py does it. All grid ids start as [MASK]; each step
runs the encoder on the class id + the current ids (no dropping), samples every
position from Categorical(logits over the codebook), keeps the ids already known,
and re-masks the floor(N cos(pi/2 (t+1)/T)) least confident unknown ones (at least 1,
at most #unknown - 1), confidence = log p(sampled) + temperature (1 - (t+1)/T) Gumbel;
the last step's ids go to the tokenizer's decoder. All randomness comes from the
`generator` (Gumbel-max sampling is exactly Categorical sampling), so a seed
reproduces the images. MAGE has no classifier-free guidance: `guidance_scale` is ignored.

The decoder holds no copy of the encoder: build_model hands it the model (`connect`)
and it keeps a plain reference, for the tied head and for the encoder passes while
sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features, Slots, TokenPrediction, TokenState
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder
from ocl_bench.encoders.mage import (
    TINY_MAGE_ENCODER,
    MageBlock,
    MageEncoder,
    Vocabulary,
    init_mage_weights,
    load_part,
    resolve_mage_file,
)
from ocl_bench.run.importing import read_state_dict

DECODER_PREFIXES = (
    "decoder_embed.",
    "decoder_pos_embed_learned",
    "decoder_blocks.",
    "decoder_norm.",
    "mlm_layer.",
)


class MlmLayer(nn.Module):
    """MAGE's output head: fc -> GELU -> LN(eps 1e-5) -> h W^T + bias (W given per call)."""

    def __init__(self, dim: int, word_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, word_dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(word_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        return self.ln(self.gelu(self.fc(x))) @ word_embeddings.t() + self.bias


@dataclass(frozen=True)
class MageDecoderParams:
    embed_dim: int = param(
        0,
        "decoder width; 0 = the checkpoint's with pretrained=true, else the encoder's token "
        "width (MAGE B and L)",
        ge=0,
    )
    depth: int = param(0, "decoder blocks; 0 = the checkpoint's with pretrained=true, else 8", ge=0)
    num_heads: int = param(16, "attention heads of the decoder blocks (MAGE: 16)", ge=1)
    dropout: float = param(0.1, "dropout and attention dropout in training (MAGE)", ge=0, lt=1)
    slots: Literal["concat", "none"] = param(
        "concat",
        "'concat': projected slots appended to the decoder's tokens (thesis); 'none': plain "
        "MAGE (no slot conditioning, no decoder masks)",
    )
    pretrained: bool = param(
        False,
        "initialise decoder_*/mlm_layer.* from a MAGE checkpoint (decoder.checkpoint or "
        "$OCL_BENCH_MAGE); slot_proj stays new",
    )
    checkpoint: str = param("", "the MAGE checkpoint for pretrained=true; empty: $OCL_BENCH_MAGE")
    checkpoint_sha256: str = param(
        "",
        "the sha256 decoder.checkpoint must have (a run that references the file instead of "
        "copying its weights); empty: not checked",
        since="0.2",
    )
    steps: int = param(12, "MaskGIT decoding steps (official script 12; README FID run 20)", ge=1)
    temperature: float = param(
        4.5, "choice temperature of the Gumbel re-masking (official 4.5; FID run 6.0)", ge=0
    )


# The tiny MAGE encoder (masked pass on) with a 1-block decoder predicting its ids: the
# conformance run of the MAGE decoder and of what reads its predictions.
TINY_MAGE_RUN: dict[str, Any] = {
    **TINY_MAGE_ENCODER,
    "encoder.masking": "mage",
    "decoder.name": "mage",
    "decoder.depth": 1,
    "decoder.num_heads": 2,
    "objectives": {"token_cross_entropy": {}},
}


class MageDecoder(nn.Module, Decoder):
    """MAGE decoder + tied MLM head over the codebook, conditioned on slots; MaskGIT sampling."""

    kind = "decoder"
    name = "mage"
    Params = MageDecoderParams
    conformance = TINY_MAGE_RUN
    output = TokenPrediction
    requires = frozenset(
        {
            "features.masked_tokens",
            "features.kept",
            "features.token_ids",
            "features.token_mask",
            "slots.slots",
        }
    )
    provides = frozenset({"generation.images"})

    @classmethod
    def capabilities(cls, params: MageDecoderParams) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        if params.slots == "concat":
            gives.add("decoding.masks")
        return needs, gives

    def __init__(self, params: MageDecoderParams, dims: Dims):
        super().__init__()
        if dims.grid is None or dims.token_dim is None or dims.vocab_size is None:
            raise ValueError("the mage decoder needs an encoder over token ids (mage_vitb16)")
        if params.slots == "concat" and dims.slot_dim is None:
            raise ValueError("the mage decoder needs the slot dimension")
        self.params = params
        self.grid = dims.grid
        self.num_tokens = dims.grid[0] * dims.grid[1]
        self.vocab = Vocabulary(dims.vocab_size)
        state: dict[str, Tensor] = {}
        width, depth = params.embed_dim or dims.token_dim, params.depth or 8
        if params.pretrained:
            path = resolve_mage_file(params.checkpoint, "base", "decoder", params.checkpoint_sha256)
            state = read_state_dict(path, "MAGE checkpoint")
            state = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}
            found = state.get("decoder_embed.weight")
            width = params.embed_dim or (int(found.shape[0]) if found is not None else width)
            depth = params.depth or len(
                {k.split(".")[1] for k in state if k.startswith("decoder_blocks.")}
            )
        self.decoder_embed = nn.Linear(dims.token_dim, width)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, width))
        self.decoder_blocks = nn.ModuleList(
            MageBlock(width, params.num_heads, params.dropout) for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.mlm_layer = MlmLayer(width, dims.token_dim, self.vocab.size)
        self.slot_proj = nn.Linear(dims.slot_dim, width) if params.slots == "concat" else None
        init_mage_weights(self)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        self.weights_source = "random init"
        if params.pretrained:
            where = f"the MAGE checkpoint {path} for decoder 'mage'"
            load_part(self, state, ("slot_proj.",), where)
            self.weights_source = str(path)
        self._encoder: MageEncoder | None = None

    def output_dims(self, dims: Dims) -> Dims:
        return dims

    def connect(self, model: nn.Module) -> None:
        """Keep a plain (non-submodule) reference to the model's MAGE encoder."""
        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, MageEncoder):
            raise ConfigError(
                f"decoder 'mage' needs the MAGE encoder (encoder.name=mage_vitb16), not "
                f"{type(encoder).__name__}: its head is tied to that encoder's embeddings"
            )
        if encoder.vocab != self.vocab or encoder.grid != self.grid:
            raise ConfigError(
                f"decoder 'mage' was built for {self.vocab.codebook_size} codes on a "
                f"{self.grid} grid, the encoder has {encoder.vocab.codebook_size} on {encoder.grid}"
            )
        object.__setattr__(self, "_encoder", encoder)

    @property
    def encoder(self) -> MageEncoder:
        if self._encoder is None:
            raise ConfigError("decoder 'mage' is not connected to an encoder (use build_model)")
        return self._encoder

    # the decoder ----------------------------------------------------------------------------
    def decode(
        self, encoded: Tensor, kept: Tensor | None, masked: Tensor, slots: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """(logits [B,1+N,V] over the whole vocabulary, masks [B,N,K] or None).

        encoded [B,1+N',D]: class token then the `kept` positions (None: all N, in order);
        masked bool[B,N]: the positions to fill with the class token (dropped or [MASK]).
        """
        x = self.decoder_embed(encoded)
        b, _, d = x.shape
        cls = x[:, :1].expand(b, 1 + self.num_tokens, d)
        if kept is None:
            full = x
        else:
            rows = (kept + 1).unsqueeze(-1).expand(-1, -1, d)
            full = cls.scatter(1, rows, x[:, 1:])
        fill = torch.cat([masked.new_zeros(b, 1), masked], 1).unsqueeze(-1)
        full = torch.where(fill, cls, full) + self.decoder_pos_embed_learned
        n_grid = full.shape[1]
        if slots is not None and self.slot_proj is not None:
            full = torch.cat([full, self.slot_proj(slots)], 1)
        weights = None
        for blk in self.decoder_blocks:
            full, weights = blk(full)
        h = self.decoder_norm(full[:, :n_grid])
        word = self.encoder.token_emb.word_embeddings.weight.detach()
        logits = self.mlm_layer(h, word)
        masks = None
        if weights is not None and full.shape[1] > n_grid:
            to_slots = weights[:, :, 1:n_grid, n_grid:].sum(1)
            masks = to_slots / to_slots.sum(-1, keepdim=True).clamp_min(1e-12)
        return logits, masks

    def forward(self, slots: Slots, features: Features, batch: Batch) -> TokenPrediction:
        if features.masked_tokens is None or features.token_mask is None:
            raise ConfigError("decoder 'mage' needs the masked pass: set encoder.masking=mage")
        masked = features.token_mask != int(TokenState.VISIBLE)
        logits, masks = self.decode(features.masked_tokens, features.kept, masked, slots.slots)
        return TokenPrediction(
            logits=logits[:, 1:, : self.vocab.codebook_size],
            target_ids=features.token_ids,
            predicted=masked,
            masks=masks,
        )

    # generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_ids(
        self,
        slots: Tensor | None,
        ids: Tensor | None = None,
        *,
        steps: int | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        batch: int | None = None,
    ) -> Tensor:
        """MaskGIT decoding: grid ids long[B,N] with no [MASK] left. `ids` may give known
        ids (the rest [MASK]); None starts from all [MASK] (`batch` images when no slots)."""
        steps = self.params.steps if steps is None else steps
        temp = self.params.temperature if temperature is None else temperature
        if steps < 1:
            raise ConfigError(f"generation needs at least 1 step, got {steps}")
        mask_id, n = self.vocab.mask_id, self.num_tokens
        device = self.decoder_pos_embed_learned.device
        if ids is None:
            b = slots.shape[0] if slots is not None else int(batch or 1)
            ids = torch.full((b, n), mask_id, dtype=torch.long, device=device)
        current = ids.to(device).long()
        sampled = current
        for step in range(steps):
            unknown = current == mask_id
            encoded = self.encoder.encode_ids(current)
            logits = self.decode(encoded, None, unknown, slots)[0][
                :, 1:, : self.vocab.codebook_size
            ]
            logits = logits.float()
            log_probs = logits.log_softmax(-1)
            drawn = (log_probs + _gumbel(log_probs.shape, generator, device)).argmax(-1)
            sampled = torch.where(unknown, drawn, current)
            ratio = (step + 1) / steps
            mask_len = torch.full_like(
                unknown[:, :1], math.floor(n * math.cos(math.pi / 2 * ratio)), dtype=torch.long
            )
            mask_len = torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len).clamp_min(1)
            chosen = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
            chosen = torch.where(unknown, chosen, torch.full_like(chosen, math.inf))
            confidence = chosen + temp * (1 - ratio) * _gumbel(chosen.shape, generator, device)
            cutoff = confidence.sort(-1).values.gather(-1, mask_len - 1)
            current = torch.where(confidence <= cutoff, torch.full_like(sampled, mask_id), sampled)
        return sampled

    def sampling_protocol(self, steps: int | None, guidance_scale: float | None) -> dict[str, Any]:
        """How generate() samples with these settings: stored beside generation metrics."""
        side = (
            self.grid[0] * self.encoder.tokenizer.downsample,
            self.grid[1] * self.encoder.tokenizer.downsample,
        )
        return {
            "sampler": "MaskGIT (cosine schedule, Gumbel re-masking)",
            "steps": self.params.steps if steps is None else steps,
            "choice_temperature": self.params.temperature,
            "guidance_scale": None,  # MAGE has no classifier-free guidance
            "generated_resolution": list(side),
        }

    @torch.no_grad()
    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images [B,3,H,W] in [0, 1] decoded iteratively from the slots alone."""
        ids = self.sample_ids(slots.slots, steps=steps, generator=generator)
        return self.encoder.tokenizer.decode(ids.view(-1, *self.grid))


def _gumbel(shape: Any, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Gumbel(0, 1) noise drawn from `generator` (on its own device), moved to `device`."""
    where = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=where, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    return (-torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-16)))).to(device, torch.float32)


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [MageDecoder]


__all__ = ["DECODER_PREFIXES", "MageDecoder", "MageDecoderParams", "MlmLayer"]
