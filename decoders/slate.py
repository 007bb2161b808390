"""SLATE's slot-conditioned autoregressive transformer over dVAE tokens.

Singh et al., "Illiterate DALL-E Learns to Compose" (ICLR 2022); official code
github.com/singhgautam/slate (slate.py, transformer.py, train.py). What this decoder does,
as the official code does it:

- the image is tokenised by the decoder's own dVAE (image_tokenizers/dvae.py), trained
  alongside with its pixel MSE (returned in `extras`, added by the `tokenizer_loss`
  objective); the transformer's inputs and targets are the dVAE's hard tokens, detached,
  so the cross-entropy never reaches the dVAE. In training the targets are Gumbel-argmax
  samples of the dVAE's categorical (slate.py: gumbel_softmax(hard=True) on the logits),
  in evaluation and generation the argmax;
- inputs: a learned dictionary over vocab + 1 entries (entry 0 is BOS, token v is entry
  v + 1), plus a learned position embedding over 1 + h * w positions (trunc-normal init,
  std 1), then dropout; teacher forcing reads [BOS, t_0 .. t_{N-2}] and predicts t_0 ..
  t_{N-1} in raster order;
- slots are projected by Linear(slot_dim, d_model, bias=False) (no LayerNorm, unlike SPOT)
  and attended to by a pre-LN decoder: causal self-attention, cross-attention, ReLU FFN
  (4 d), no biases in attention, xavier init with gain (3 * layers) ** -0.5 on the residual
  outputs, kaiming FFN input, and block 0 replacing its input by LN(input) (official quirk);
  a final LayerNorm and Linear(d_model, vocab, bias=False) give the logits;
- the loss is the cross-entropy summed over tokens and averaged over images
  (`token_cross_entropy` with reduction "sum_per_image");
- generation: greedy decoding of all h * w tokens from BOS (slate.py reconstruct_autoregressive),
  then the dVAE decoder on their one-hot vectors, clamped to [0, 1]. Here the attention
  keys and values are cached, so each new token costs one position, not the whole prefix
  (same logits); `sampling = "sample"` draws tokens from the softmax with a seeded generator.

Object discovery: SLATE reports its slot-attention masks (`tasks.object_discovery.masks =
["attn"]`); this decoder also offers the last block's cross-attention (summed over heads,
normalised over slots) as decoder masks on the token grid.

One difference from the official model, by design of the harness: official SLATE feeds
slot attention with the same dictionary + position embeddings of the dVAE tokens; here
the encoder plugin feeds it (a CNN in the `slate` preset, as SlotDiffusion's SLATE, whose
numbers both source documents quote).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features, Slots, TokenPrediction
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder
from ocl_bench.api.tokenizing import ImageTokenizer
from ocl_bench.api.transformer import DecoderBlock, linear
from ocl_bench.run.registry import build_tokenizer

TOKENIZER_LOSS = "tokenizer_loss."  # extras keys the tokenizer_loss objective adds


@dataclass(frozen=True)
class SlateParams:
    d_model: int = param(192, "transformer width (SLATE: 192)", ge=1)
    num_layers: int = param(8, "decoder blocks (SlotDiffusion's SLATE: 8; 3D-Shapes: 4)", ge=1)
    num_heads: int = param(4, "attention heads (SLATE: 4)", ge=1)
    dropout: float = param(0.1, "dropout on positions, attention and FFN (SLATE: 0.1)", ge=0, lt=1)
    targets: Literal["sampled", "argmax"] = param(
        "sampled",
        "training targets: Gumbel-argmax samples of the dVAE (SLATE) or its argmax "
        "(SlotDiffusion's frozen dVAE); evaluation always uses the argmax",
    )
    sampling: Literal["greedy", "sample"] = param(
        "greedy", "generation: argmax tokens (SLATE) or tokens drawn from the softmax"
    )
    temperature: float = param(1.0, "softmax temperature when sampling='sample'", gt=0)
    vocab_size: int = param(4096, "dVAE codebook size", ge=2)
    tokenizer_channels: int = param(64, "dVAE hidden channels", ge=1)
    tau_start: float = param(1.0, "dVAE Gumbel temperature at step 0", gt=0)
    tau_final: float = param(0.1, "dVAE temperature after tau_steps", gt=0)
    tau_steps: int = param(30000, "steps of the dVAE temperature cosine", ge=0)
    hard_tokens: bool = param(False, "straight-through hard tokens in the dVAE's pixel decoder")
    tokenizer_loss_reduction: Literal["sum_per_image", "mean"] = param(
        "sum_per_image", "dVAE MSE: summed per image (SLATE) or mean over elements"
    )
    tokenizer_weights: str = param("", "dVAE checkpoint ('' reads $OCL_BENCH_DVAE, unset = random)")
    train_tokenizer: bool = param(
        True, "train the dVAE alongside (SLATE); false = frozen (SlotDiffusion's pre-trained one)"
    )
    tokenizer_lr: float = param(3e-4, "peak lr of the dVAE (SLATE: 3e-4; 0 = train.lr)", ge=0)
    tokenizer_warmup: bool = param(
        False, "the dVAE lr follows train's warm-up/decay; SLATE keeps it constant"
    )
    transformer_lr: float = param(
        0.0, "peak lr of the transformer (0 = train.lr; SlotDiffusion's SLATE: 3e-4)", ge=0
    )
    decoder_masks: bool = param(
        True, "offer the last block's cross-attention as decoder masks (SLATE reports 'attn')"
    )


# One SLATE block of width 32 over a 32-code dVAE of 8 channels trained alongside: the
# conformance run of SLATE and of its dVAE and objectives (ocl_bench.testing).
TINY_SLATE_RUN: dict[str, Any] = {
    "decoder.name": "slate",
    "decoder.d_model": 32,
    "decoder.num_layers": 1,
    "decoder.num_heads": 2,
    "decoder.vocab_size": 32,
    "decoder.tokenizer_channels": 8,
    "decoder.tau_steps": 4,
    "objectives": {"token_cross_entropy": {}, "tokenizer_loss": {}},
}


class SlateDecoder(nn.Module, Decoder):
    """SLATE: autoregressive transformer over its own dVAE's tokens, conditioned on slots."""

    kind = "decoder"
    name = "slate"
    Params = SlateParams
    conformance = TINY_SLATE_RUN
    output = TokenPrediction
    requires = frozenset({"slots.slots"})

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        gives |= {"generation.images", "decoding.tokenizer_losses"}
        if params.decoder_masks:
            gives.add("decoding.masks")
        return needs, gives

    def __init__(self, params: SlateParams, dims: Dims):
        super().__init__()
        if dims.slot_dim is None:
            raise ValueError("the slate decoder needs the slot dimension")
        if params.d_model % params.num_heads:
            raise ValueError(f"d_model {params.d_model} is not divisible by {params.num_heads}")
        self.params = params
        self.tokenizer: ImageTokenizer = build_tokenizer(
            "dvae",
            {
                "vocab_size": params.vocab_size,
                "channels": params.tokenizer_channels,
                "tau_start": params.tau_start,
                "tau_final": params.tau_final,
                "tau_steps": params.tau_steps,
                "hard": params.hard_tokens,
                "loss_reduction": params.tokenizer_loss_reduction,
                "weights": params.tokenizer_weights,
            },
            "decoder",
        )
        if not params.train_tokenizer:
            self.tokenizer.requires_grad_(False)
        self.token_grid = self.tokenizer.grid(tuple(dims.image_size))
        n = self.token_grid[0] * self.token_grid[1]
        d, v = params.d_model, params.vocab_size
        self.dictionary = nn.Embedding(v + 1, d)  # entry 0 = BOS
        self.pe = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1 + n, d)))
        self.pe_dropout = nn.Dropout(params.dropout)
        self.slot_proj = linear(dims.slot_dim, d, bias=False)
        gain = (3 * params.num_layers) ** -0.5
        heads = params.num_heads
        # block 0 restarts the residual stream from LN(input) (official quirk)
        self.blocks = nn.ModuleList(
            DecoderBlock(
                d,
                heads,
                heads,
                4 * d,
                params.dropout,
                gain,
                norm_residual=i == 0,
                queries_first=False,
            )
            for i in range(params.num_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.out = linear(d, v, bias=False)

    def output_dims(self, dims: Dims) -> Dims:
        dims.vocab_size = self.params.vocab_size
        return dims

    def param_groups(self) -> list[dict[str, Any]]:
        """The dVAE at its own lr, constant unless tokenizer_warmup (SLATE's train.py); the
        transformer at transformer_lr when set (else with the default group)."""
        p = self.params
        groups: list[dict[str, Any]] = []
        if p.train_tokenizer:
            group: dict[str, Any] = {"params": list(self.tokenizer.parameters()), "name": "dvae"}
            if p.tokenizer_lr > 0:
                group["lr"] = p.tokenizer_lr
            if not p.tokenizer_warmup:
                group["constant_lr"] = True
            groups.append(group)
        if p.transformer_lr > 0:
            own = {id(q) for q in self.tokenizer.parameters()}
            rest = [q for q in self.parameters() if id(q) not in own]
            groups.append({"params": rest, "lr": p.transformer_lr, "name": "transformer"})
        return groups

    def embed_inputs(self, ids: Tensor) -> Tensor:
        """Inputs [B, T, D] for ids [B, T-1] after BOS: dictionary + position, dropout."""
        bos = ids.new_zeros(ids.shape[0], 1)
        x = self.dictionary(torch.cat([bos, ids + 1], 1))
        return self.pe_dropout(x + self.pe[:, : x.shape[1]])

    def logits(self, slots: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits [B, N, V] for the raster token ids [B, N] and the last
        block's cross-attention summed over heads, normalised over slots [B, N, K]."""
        memory = self.slot_proj(slots)
        x = self.embed_inputs(ids[:, :-1])
        weights = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, weights = block(x, block.memory(memory), explicit_cross=i == last)
        assert weights is not None
        masks = weights.sum(1)
        return self.out(self.layer_norm(x)), masks / masks.sum(-1, keepdim=True)

    def forward(self, slots: Slots, features: Features, batch: Batch) -> TokenPrediction:
        images = batch.images
        extras: dict[str, Tensor] = {}
        sampled = self.training and self.params.targets == "sampled"
        losses: dict[str, Tensor] = {}
        if self.training and self.params.train_tokenizer and sampled:
            losses, ids = self.tokenizer.losses_and_sample(images)  # one encoder pass
        else:
            if self.training and self.params.train_tokenizer:
                losses = self.tokenizer.losses(images)
            with torch.no_grad():
                ids = self.tokenizer.sample(images) if sampled else self.tokenizer.encode(images)
        # the ids are detached: the transformer never trains the dVAE (as SLATE)
        ids = ids.flatten(1)
        for name, value in losses.items():
            extras[TOKENIZER_LOSS + name] = value
        logits, masks = self.logits(slots.slots, ids)
        return TokenPrediction(
            logits=logits,
            target_ids=ids,
            predicted=torch.ones_like(ids, dtype=torch.bool),
            masks=masks if self.params.decoder_masks else None,
            mask_grid=self.token_grid,
            extras=extras,
        )

    @torch.no_grad()
    def sample_ids(self, slots: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Token ids [B, h, w] decoded one position at a time from BOS, keys and values
        cached (the same logits as teacher forcing on the decoded prefix)."""
        b = slots.shape[0]
        h, w = self.token_grid
        memories = self.memories(slots)
        caches: list[list[Tensor]] = [[] for _ in self.blocks]
        token = torch.zeros(b, dtype=torch.long, device=slots.device)  # BOS = entry 0
        out = []
        for t in range(h * w):
            logits = self.decode_step(token, t, memories, caches)
            if self.params.sampling == "greedy":
                ids = logits.argmax(-1)
            else:
                probs = (logits / self.params.temperature).softmax(-1)
                where = generator.device if generator is not None else probs.device
                ids = torch.multinomial(probs.to(where), 1, generator=generator)[:, 0]
                ids = ids.to(slots.device)
            out.append(ids)
            token = ids + 1
        return torch.stack(out, 1).view(b, h, w)

    def memories(self, slots: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each block's cross-attention keys and values of slots [B, K, Ds]."""
        memory = self.slot_proj(slots)
        return [block.memory(memory) for block in self.blocks]

    def decode_step(
        self,
        entry: Tensor,
        position: int,
        memories: list[tuple[Tensor, Tensor]],
        caches: list[list[Tensor]],
    ) -> Tensor:
        """Logits [B, V] of the token at `position` + 1 from dictionary entries [B] (BOS = 0,
        token v = v + 1) at `position`; `caches` hold the earlier positions' keys and values
        and gain this one's."""
        x = self.pe_dropout(self.dictionary(entry[:, None]) + self.pe[:, position : position + 1])
        for block, memory, cache in zip(self.blocks, memories, caches):
            x = block(x, memory, cache=cache)[0]
        return self.out(self.layer_norm(x))[:, -1].float()

    @torch.no_grad()
    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1]: every token decoded from the slots, then the dVAE
        decoder (steps and guidance do not apply to autoregressive decoding)."""
        return self.tokenizer.decode(self.sample_ids(slots.slots, generator))


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SlateDecoder]


__all__ = ["TOKENIZER_LOSS", "SlateDecoder", "SlateParams"]
