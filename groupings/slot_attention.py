"""Slot Attention (Locatello et al. 2020) with the SPOT / BO-QSA / OCLF options.

The defaults are the harness's SPOT-style module. OCLF (amazon-science/
object-centric-learning-framework), DINOSAUR's official framework, differs in two places,
each a named param:

- `pre_mlp_out`: OCLF's pre-MLP is `build_two_layer_mlp(input_dim, output_dim=feature_dim,
  hidden_dim=input_dim, initial_layer_norm=True)` with feature_dim = object_dim
  (configs/experiment/projects/bridging/dinosaur/_base_feature_recon.yaml), i.e.
  LN(768) -> Linear 768->768 -> ReLU -> Linear 768->256; slot attention's input LayerNorm
  and k/v projections then act on 256-d features (ocl/perceptual_grouping.py SlotAttention:
  norm_input = LayerNorm(feature_dim), to_k/to_v = Linear(feature_dim, kvq_dim)).
  SPOT's pre-MLP keeps 768 -> 768 -> 768.
- `zero_mlp_bias`: OCLF's build_mlp (ocl/neural_networks/convenience.py) zero-initialises
  every Linear bias of the pre-MLP and of the slot update MLP (ff_mlp); the harness
  keeps torch's default uniform bias init.

Two more official variants, each a named param:

- `num_heads` (StableLSD / GLASS `MultiHeadSTEVESA`, src/models/slot_attn.py): q, k, v are
  split into heads of slot_dim / num_heads channels; the logits of every (head, slot) pair
  of a token are softmaxed *together* (one softmax over heads x slots, not one per head),
  renormalised over tokens per head, and the per-head updates are concatenated. The keys
  stay scaled by slot_dim ** -0.5 (the whole slot size, as the official code). `attn` is
  the attention summed over heads (what StableLSD's eval.py reduces to masks: still a
  distribution over slots) and `logits` their log-sum-exp over heads (softmax of it is
  `attn`). num_heads = 1 is the one-head module, computed as before.
- `pre_mlp_hidden` and `position = "linspace"` (SlotDiffusion, img_based/models/
  slot_attention.py): its encoder_out_layer is LN(C) -> Linear(C, D) -> ReLU -> Linear(D, D)
  (hidden = D, not C), and its SoftPositionEmbed adds Linear(4 -> C) of a linspace(0, 1)
  grid (row, col, 1 - row, 1 - col), corners at 0 and 1, where STEVE's code takes cell centres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features, Slots
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.layers import mlp
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Grouping


@dataclass(frozen=True)
class SlotAttentionParams:
    num_slots: int = param(7, "number of slots K", ge=1)
    slot_dim: int = param(64, "slot dimension", ge=1)
    iterations: int = param(3, "attention iterations", ge=1)
    mlp_hidden: int = param(128, "hidden size of the slot update MLP", ge=1)
    init: Literal["shared_gaussian", "learned_queries", "boxes"] = param(
        "shared_gaussian",
        "shared Gaussian (sampled, also in eval), learned per-slot queries, or 'boxes': an MLP"
        " of the first K ground-truth boxes (x1, y1, x2, y2 in pixels of a box_frame-px image,"
        " -1 past the last object; StableLSD-BBox Init, GLASS's bbox_mlp: Linear 4->2d, ReLU,"
        " Linear 2d->d)",
    )
    box_frame: int = param(
        256,
        "init='boxes': boxes reach the MLP in pixels of a box_frame-px square image, whatever"
        " the dataset's resolution (GLASS: 256, its image size, so its bbox_mlp weights load"
        " as they are); 0 = fractions of the image",
        ge=0,
    )
    truncation: Literal["none", "bi-level"] = param(
        "none", "'bi-level': gradient flows through the last iteration only (BO-QSA)"
    )
    pre_mlp: bool = param(False, "LayerNorm + 2-layer MLP on the input tokens (SPOT)")
    pre_mlp_out: int = param(
        0,
        "output size of the pre-MLP (needs pre_mlp); 0 = the token dim (SPOT: 768 -> 768 ->"
        " 768). OCLF's DINOSAUR uses slot_dim (768 -> 768 -> 256), so the input LayerNorm and"
        " k/v then see pre_mlp_out-d features",
        ge=0,
    )
    pre_mlp_hidden: int = param(
        0,
        "hidden size of the pre-MLP (needs pre_mlp); 0 = the token dim. SlotDiffusion's"
        " encoder_out_layer uses slot_dim (384 -> 256 -> 256 with pre_mlp_out = 256)",
        ge=0,
        since="0.2",
    )
    num_heads: int = param(
        1,
        "attention heads (StableLSD/GLASS MultiHeadSTEVESA num_heads): one softmax over heads x"
        " slots per token, per-head updates concatenated; slot_dim must divide by it. attn is"
        " summed over heads",
        ge=1,
        since="0.2",
    )
    zero_mlp_bias: bool = param(
        False,
        "zero-initialise the Linear biases of the pre-MLP and the update MLP (OCLF build_mlp);"
        " false = torch's default uniform init",
    )
    eps: float = param(1e-8, "added to the attention before renormalising over tokens", gt=0)
    position: Literal["none", "cartesian", "linspace"] = param(
        "none",
        "'cartesian': add Linear(4 -> token dim) of each token's cell-centre coordinates"
        " (row, col, 1-row, 1-col) in [0, 1] before the pre-MLP (STEVE / StableLSD's"
        " CartesianPositionalEmbedding, a 1x1 conv there); 'linspace': the same of a"
        " linspace(0, 1) grid, first and last cells at 0 and 1 (SlotDiffusion's"
        " SoftPositionEmbed)",
    )
    dynamic_slots: bool = param(
        False,
        "StableLSD-Dynamic (GLASS Fig. 4a): only the first M slots attend, M = the image's"
        " objects (batch.instance_masks, at least 1); the others' logits are -inf (GLASS's"
        " num_objs / use_mask)",
    )


class SlotAttention(nn.Module, Grouping):
    """Iterative competitive attention of K slots over the encoder tokens."""

    kind = "grouping"
    name = "slot_attention"
    Params = SlotAttentionParams
    # The suite's tiny base run uses slot attention: 3 slots of 16, 2 iterations.
    conformance = {}
    requires = frozenset({"features.tokens"})
    provides = frozenset({"slots.slots", "slots.attn", "slots.logits", "slots.init"})

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        if params.dynamic_slots:
            needs.add("batch.instance_masks")
        if params.init == "boxes":
            needs.add("batch.boxes")
        return needs, gives

    @property
    def reads_batch(self) -> bool:
        """Whether the composed model hands forward() the batch (dynamic slot counts, slots
        initialised from boxes)."""
        return self.params.dynamic_slots or self.params.init == "boxes"

    def __init__(self, params: SlotAttentionParams, dims: Dims):
        super().__init__()
        if dims.token_dim is None:
            raise ValueError("slot attention needs the encoder's token dimension")
        self.params = params
        if params.pre_mlp_out < 0:
            raise ValueError(f"pre_mlp_out must be 0 or positive, got {params.pre_mlp_out}")
        if (params.pre_mlp_out or params.pre_mlp_hidden) and not params.pre_mlp:
            raise ValueError("pre_mlp_out and pre_mlp_hidden need pre_mlp = true")
        if params.slot_dim % params.num_heads:
            raise ValueError(
                f"slot_dim={params.slot_dim} must divide by num_heads={params.num_heads}"
            )
        d_tokens, d = dims.token_dim, params.slot_dim
        if params.position != "none":
            self.pos_proj = nn.Linear(4, d_tokens)
        # d_in: the size of what the input LayerNorm and k/v see
        d_in = params.pre_mlp_out or d_tokens
        hidden = params.pre_mlp_hidden or d_tokens
        self.pre_mlp = (
            nn.Sequential(nn.LayerNorm(d_tokens), mlp([d_tokens, hidden, d_in]))
            if params.pre_mlp
            else nn.Identity()
        )
        self.norm_inputs = nn.LayerNorm(d_in)
        self.to_k = nn.Linear(d_in, d, bias=False)
        self.to_v = nn.Linear(d_in, d, bias=False)
        self.to_q = nn.Linear(d, d, bias=False)
        self.norm_slots = nn.LayerNorm(d)
        self.gru = nn.GRUCell(d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.update_mlp = mlp([d, params.mlp_hidden, d])
        if params.zero_mlp_bias:
            for layer in [*self.pre_mlp.modules(), *self.update_mlp.modules()]:
                if isinstance(layer, nn.Linear) and layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if params.init == "shared_gaussian":
            self.mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, d)))
            self.log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, d)))
        elif params.init == "boxes":
            self.box_mlp = nn.Sequential(nn.Linear(4, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        else:
            self.queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(params.num_slots, d)))
        self.scale = d**-0.5

    def output_dims(self, dims: Dims) -> Dims:
        dims.slot_dim, dims.num_slots = self.params.slot_dim, self.params.num_slots
        return dims

    def box_slots(self, batch: Batch | None, device: torch.device) -> Tensor:
        """[B,K,d]: the box MLP of each image's first K boxes. Slots past the last object
        get the box (-1, -1, -1, -1), GLASS's padding. GLASS feeds pixel coordinates of its
        256-px images: boxes are rescaled to that frame (`box_frame`), so the same numbers
        reach the MLP at any dataset resolution."""
        if batch is None or batch.boxes is None:
            raise ValueError("slot attention init='boxes' needs the batch's boxes")
        # boxes are in pixels of the masks, which may be larger than the images (COCO: 320)
        frame = batch.instance_masks if batch.instance_masks is not None else batch.images
        h, w = frame.shape[-2:]
        k = self.params.num_slots
        scale = torch.tensor([w, h, w, h], device=device, dtype=torch.float32)
        if self.params.box_frame:
            scale = scale / self.params.box_frame
        boxes = batch.boxes[:, :k].to(device).float() / scale
        real = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # not padding
        boxes = torch.where(real[..., None], boxes, torch.full_like(boxes, -1.0))
        if boxes.shape[1] < k:
            boxes = torch.nn.functional.pad(boxes, (0, 0, 0, k - boxes.shape[1]), value=-1.0)
        return self.box_mlp(boxes.to(self.box_mlp[0].weight.dtype))

    def initial_slots(self, batch_size: int, device: torch.device) -> Tensor:
        k, d = self.params.num_slots, self.params.slot_dim
        if self.params.init == "shared_gaussian":
            noise = torch.randn(batch_size, k, d, device=device)
            return self.mu + self.log_sigma.exp() * noise
        if self.params.init == "boxes":
            raise ValueError("slot attention init='boxes' needs the batch's boxes")
        return self.queries.unsqueeze(0).expand(batch_size, -1, -1)

    def step(
        self, slots: Tensor, k: Tensor, v: Tensor, active: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One iteration: returns (new slots, attention softmaxed over slots, logits).
        `active` bool[B,K]: slots that may attend (the others get -inf logits)."""
        q = self.to_q(self.norm_slots(slots))
        if self.params.num_heads > 1:
            return self.multi_head_step(slots, q, k, v, active)
        logits = torch.einsum("bnd,bkd->bnk", k, q)
        if active is not None:
            logits = logits.masked_fill(~active[:, None, :], float("-inf"))
        attn = logits.softmax(dim=-1)
        weights = attn + self.params.eps
        weights = weights / weights.sum(dim=1, keepdim=True)
        updates = torch.einsum("bnk,bnd->bkd", weights, v)
        b, n_slots, d = slots.shape
        slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).reshape(b, n_slots, d)
        slots = slots + self.update_mlp(self.norm_mlp(slots))
        return slots, attn, logits

    def multi_head_step(
        self, slots: Tensor, q: Tensor, k: Tensor, v: Tensor, active: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`step` with num_heads > 1: one softmax per token over (head, slot) pairs, as
        MultiHeadSTEVESA; returns the attention summed over heads and the logits'
        log-sum-exp over heads (so softmax(logits) is that attention)."""
        b, n_slots, d = slots.shape
        h = self.params.num_heads
        kh, vh = k.unflatten(-1, (h, d // h)), v.unflatten(-1, (h, d // h))  # [B,N,H,dh]
        qh = q.unflatten(-1, (h, d // h))  # [B,K,H,dh]
        logits = torch.einsum("bnhd,bkhd->bnhk", kh, qh)
        if active is not None:
            logits = logits.masked_fill(~active[:, None, None, :], float("-inf"))
        attn = logits.flatten(2).softmax(dim=-1).unflatten(-1, (h, n_slots))  # [B,N,H,K]
        weights = attn + self.params.eps
        weights = weights / weights.sum(dim=1, keepdim=True)  # per head, over tokens
        updates = torch.einsum("bnhk,bnhd->bkhd", weights, vh).reshape(b * n_slots, d)
        slots = self.gru(updates, slots.reshape(-1, d)).reshape(b, n_slots, d)
        slots = slots + self.update_mlp(self.norm_mlp(slots))
        return slots, attn.sum(dim=2), logits.logsumexp(dim=2)

    def cartesian_code(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """float[h*w, 4]: (row, col, 1-row, 1-col) at cell centres (position 'cartesian')
        or on a linspace(0, 1) grid (position 'linspace'), raster order."""
        h, w = grid
        if self.params.position == "linspace":
            rows = torch.linspace(0.0, 1.0, h, device=device)
            cols = torch.linspace(0.0, 1.0, w, device=device)
        else:
            rows = (torch.arange(h, device=device) + 0.5) / h
            cols = (torch.arange(w, device=device) + 0.5) / w
        r, c = torch.meshgrid(rows, cols, indexing="ij")
        return torch.stack([r, c, 1 - r, 1 - c], dim=-1).reshape(h * w, 4)

    def active_slots(self, batch: Batch | None, device: torch.device) -> Tensor | None:
        """bool[B,K]: the first min(K, max(1, objects)) slots of each image (dynamic_slots)."""
        if not self.params.dynamic_slots or batch is None or batch.instance_masks is None:
            return None
        objects = batch.instance_masks.flatten(2).any(-1).sum(1).clamp(1, self.params.num_slots)
        ranks = torch.arange(self.params.num_slots, device=device)
        return ranks[None, :] < objects.to(device)[:, None]

    def forward(self, features: Features, batch: Batch | None = None) -> Slots:
        tokens = features.tokens
        active = self.active_slots(batch, tokens.device)
        if self.params.position != "none":
            code = self.cartesian_code(features.grid, tokens.device).to(tokens.dtype)
            tokens = tokens + self.pos_proj(code)
        tokens = self.norm_inputs(self.pre_mlp(tokens))
        k = self.to_k(tokens) * self.scale
        v = self.to_v(tokens)
        if self.params.init == "boxes":
            init = self.box_slots(batch, tokens.device)
        else:
            init = self.initial_slots(tokens.shape[0], tokens.device)
        slots = init
        attn = logits = None
        for i in range(self.params.iterations):
            last = i == self.params.iterations - 1
            if last and self.params.truncation == "bi-level":
                # BO-QSA: the last iteration sees detached slots, but the init keeps a
                # straight-through gradient so learned queries still train.
                slots = slots.detach() + init - init.detach()
            slots, attn, logits = self.step(slots, k, v, active)
        assert attn is not None
        return Slots(slots=slots, attn=attn, logits=logits, init=init)


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SlotAttention]
