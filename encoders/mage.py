"""MAGE's ViT encoder over VQGAN token ids (Li et al., "MAGE: MAsked Generative Encoder to
Unify Representation Learning and Image Synthesis", CVPR 2023; github.com/LTH14/mage).

Re-implemented from the facts in ../shared/reference/spot-and-mage.md (sections h-j):

- the images (in [0, 1], resized to `image_size`) become a grid of ids by a frozen image
  tokenizer plugin (`tokenizer`, default the MaskGIT-style "vqgan"; 16x16 ids at 256 px);
- vocabulary: codebook + 1000 class ids + 1 [MASK]; the sequence is the fake class id
  (codebook + 76, official 1100) followed by the grid ids; [MASK] is the last id (2024);
- `token_emb` is BERT's embedding (word + learned position embeddings, LayerNorm eps 1e-6,
  dropout 0.1, a `position_ids` buffer); then ViT blocks (qkv bias, dropout and attention
  dropout 0.1, LN eps 1e-6, attention logits in fp32 with max subtraction) and `norm`.

Module names give the official keys (`token_emb.*`, `blocks.i.*`, `norm.*`), so a MAGE
checkpoint's encoder part loads strictly; its `vqgan.*` keys belong to the tokenizer.

Two branches on one encoder (thesis section 4.1.2). `Features.tokens` is always the pass
over all visible ids (class token removed): what slot attention reads, and `targets`
for a feature-reconstruction decoder (SPOT, stage 1). With `masking = "mage"` a second
pass sees the masked input, MAGE's way: one truncated-Gaussian ratio r per step (mean
0.55, std 0.25, in [0.5, 1]), ceil(N r) positions masked, the ceil(N drop_ratio) with
the lowest noise among them dropped (removed before the encoder, after the position
embedding), the other masked ones fed as [MASK]. That pass lands in
`Features.masked_tokens` (class token first, then the `kept` positions) with
`token_mask` (TokenState per position) for the MAGE decoder. In eval the same schedule
runs unless `eval_mask_ratio` fixes the ratio.

Given masks instead of the draw (public API, e.g. to replay the official code's masks):
a `TokenMasks(masked, dropped)` either as `encoder(batch, masks=...)` or, for the whole
model (encoder, grouping, decoder), as `with model.encoder.use_masks(masks): model(batch)`.
A draw and the same positions given as masks give the same output (the draw's only
effect is the positions; given masks consume no random numbers).

Frozen (default) or fine-tuned from block b (`finetune_from`, thesis Table 5.2): blocks
b.. and the final norm train; the embedding and earlier blocks stay frozen and, like a
frozen encoder, always run in eval mode (no dropout), so frozen features are
deterministic; trainable blocks use dropout 0.1 in training as MAGE does. `targets` are
the visible-pass tokens, detached (fine-tuned: from the current weights, not a frozen
copy; the embedding, [MASK] row included, never trains).

Weights: `checkpoint` (a MAGE file, `torch.load(f)["model"]`) or $OCL_BENCH_MAGE; the
tokenizer loads from the same file's `vqgan.*` keys unless `tokenizer` names its own
file. Nothing is downloaded. `checkpoint_sha256` pins the file's bytes (a run that
references the file instead of holding a copy of its weights).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features, TokenState
from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Encoder
from ocl_bench.api.tokenizing import ImageTokenizer
from ocl_bench.api.weights import file_sha256
from ocl_bench.run.feature_cache import FeatureCache
from ocl_bench.run.importing import check_keys, read_state_dict
from ocl_bench.run.registry import build_tokenizer

ENV_VAR = "OCL_BENCH_MAGE"
# (embed_dim, depth, num_heads) of the released models (M:models_mage.py).
SIZES = {"base": (768, 12, 12), "large": (1024, 24, 16)}
# The README links the files (Google Drive) without names; these are the names we suggest.
OFFICIAL_FILES = {"base": "mage-vitb-1600.pth", "large": "mage-vitl-1600.pth"}
CHECKPOINT_SOURCE = (
    "the MAGE README's ViT-Base/ViT-Large 'Checkpoint' links (github.com/LTH14/mage)"
)
NUM_CLASS_IDS = 1000
ENCODER_PREFIXES = ("token_emb.", "blocks.", "norm.")
PREPROCESS = "resize-bicubic-antialias-clamp01|mage-v1"


@dataclass(frozen=True)
class Vocabulary:
    """MAGE's id layout, derived from the codebook size as the official code does."""

    codebook_size: int

    @property
    def size(self) -> int:
        return self.codebook_size + NUM_CLASS_IDS + 1

    @property
    def fake_class_id(self) -> int:
        return self.codebook_size + 1100 - 1024

    @property
    def mask_id(self) -> int:
        return self.size - 1


@dataclass(frozen=True)
class TokenMasks:
    """Which grid positions MAGE's masked pass hides: the official `token_all_mask` and
    `token_drop_mask` (models_mage.py forward_encoder) without their class-token column.

    masked: bool[B,N], every position whose id the encoder does not see;
    dropped: bool[B,N], the masked positions removed before the encoder (the other masked
        ones are fed as [MASK]); every image keeps the same number of positions.

    Grid positions are raster order over the tokenizer's grid (N = 256 at 256 px). Float
    0/1 tensors (as the official code makes them) are accepted and stored as bool.

    Example, a ratio-0.75 mask with the first half dropped, through the whole model::

        n = model.encoder.num_tokens
        masked = torch.zeros(b, n, dtype=torch.bool)
        masked[:, : 3 * n // 4] = True
        dropped = torch.zeros_like(masked)
        dropped[:, : n // 2] = True
        with model.encoder.use_masks(TokenMasks(masked=masked, dropped=dropped)):
            out = model(batch)  # out.decoding.logits: MAGE's predictions for these masks
    """

    masked: Tensor
    dropped: Tensor

    def __post_init__(self) -> None:
        masked, dropped = self.masked.bool(), self.dropped.bool()
        if masked.dim() != 2 or masked.shape != dropped.shape:
            raise ValueError(
                f"TokenMasks: masked and dropped must both be [B, N], got "
                f"{tuple(self.masked.shape)} and {tuple(self.dropped.shape)}"
            )
        if bool((dropped & ~masked).any()):
            raise ValueError("TokenMasks: every dropped position must also be masked")
        kept = (~dropped).sum(1)
        if kept.numel() and not bool((kept == kept[0]).all()):
            raise ValueError(
                "TokenMasks: every image must keep the same number of positions, got "
                f"{sorted(set(kept.tolist()))}"
            )
        object.__setattr__(self, "masked", masked)
        object.__setattr__(self, "dropped", dropped)

    @classmethod
    def from_state(cls, state: Tensor) -> TokenMasks:
        """From a TokenState tensor uint8[B,N] (Features.token_mask of a draw)."""
        return cls(
            masked=state != int(TokenState.VISIBLE), dropped=state == int(TokenState.DROPPED)
        )

    def state(self) -> Tensor:
        """The TokenState uint8[B,N] of these masks (what Features.token_mask holds)."""
        state = torch.full(self.masked.shape, int(TokenState.VISIBLE), dtype=torch.uint8)
        state = state.to(self.masked.device)
        state[self.masked] = int(TokenState.MASKED)
        state[self.dropped] = int(TokenState.DROPPED)
        return state


class MageAttention(nn.Module):
    """Multi-head self-attention with fp32 logits and max subtraction (M:models_mage.py)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output [B,T,D], softmax weights [B,heads,T,T] in fp32, before dropout)."""
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        with torch.autocast(x.device.type, enabled=False):
            logits = (q.float() @ k.float().transpose(-2, -1)) * self.scale
        logits = logits - logits.max(dim=-1, keepdim=True).values
        weights = logits.softmax(dim=-1)
        out = (self.attn_drop(weights).to(v.dtype) @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj_drop(self.proj(out)), weights


class MageBlock(nn.Module):
    """Pre-LN ViT block of MAGE's encoder and decoder (keys norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, num_heads: int, dropout: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MageAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, this block's attention weights [B,heads,T,T])."""
        y, weights = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class TokenEmbedding(nn.Module):
    """BERT's embedding as MAGE uses it: word + learned position, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, dim: int, positions: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)  # noqa: N815 (the official key)
        self.dropout = nn.Dropout(dropout)
        # A persistent buffer: official checkpoints carry it.
        self.register_buffer("position_ids", torch.arange(positions).expand(1, -1).clone())
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        positions = self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + positions))


def init_mage_weights(module: nn.Module) -> None:
    """MAGE's init: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resolve_mage_file(path: str, size: str, who: str, sha256: str = "") -> Path:
    """The MAGE checkpoint to read: `path`, else $OCL_BENCH_MAGE; DataError naming the file.

    With `sha256` (a run that references its weights instead of copying them, `ocl-bench
    import mage ... importer.reference=true`) the file must be there and hash to it."""
    if path:
        found = Path(os.path.expandvars(path)).expanduser()
        if not found.is_file():
            if sha256:
                raise DataError(
                    f"{who}.checkpoint: MAGE checkpoint not found: {found}; the run references "
                    f"it by sha256 {sha256[:12]}: put it back, or give its new place with "
                    "encoder.checkpoint=PATH decoder.checkpoint=PATH"
                )
            raise DataError(f"{who}.checkpoint: MAGE checkpoint not found: {found}")
        if sha256:
            actual = file_sha256(found)
            if actual != sha256:
                raise DataError(
                    f"{who}.checkpoint: MAGE checkpoint {found} changed: its sha256 is "
                    f"{actual[:12]}, the run references {sha256[:12]}; restore the original file"
                )
        return found
    if sha256:
        raise ConfigError(f"{who}.checkpoint_sha256 needs {who}.checkpoint=PATH")
    env = os.environ.get(ENV_VAR, "")
    if env:
        found = Path(env).expanduser()
        if not found.is_file():
            raise DataError(f"{ENV_VAR}={env}: MAGE checkpoint not found")
        return found
    raise DataError(
        f"no MAGE weights for {who}: download the official MAGE ViT-{size[0].upper()} "
        f"checkpoint ({OFFICIAL_FILES[size]}, from {CHECKPOINT_SOURCE}) and pass "
        f"{who}.checkpoint=PATH or set {ENV_VAR}=PATH; {who}.random_init=true runs without"
    )


def load_part(
    module: nn.Module, state: dict[str, Tensor], skip: tuple[str, ...], what: str
) -> None:
    """Load the keys of `module` outside the `skip` prefixes from `state`, strictly:
    DataError listing missing and wrongly shaped keys."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith(skip)}
    report = check_keys({k: v for k, v in state.items() if k in own}, own)
    if not report.ok:
        raise DataError(f"{what} does not fit: {report.text()}")
    module.load_state_dict({k: state[k] for k in own}, strict=False)


@dataclass(frozen=True)
class MageParams:
    size: Literal["base", "large"] = param(
        "base", "MAGE ViT-B/16 (768 wide, 12 blocks, 12 heads) or ViT-L/16 (1024, 24, 16)"
    )
    embed_dim: int = param(0, "override the token width (tiny models); 0 = the size's", ge=0)
    depth: int = param(0, "override the number of blocks; 0 = the size's", ge=0)
    num_heads: int = param(0, "override the attention heads; 0 = the size's", ge=0)
    dropout: float = param(
        0.1, "dropout and attention dropout of trainable blocks in training (MAGE)", ge=0, lt=1
    )
    checkpoint: str = param(
        "",
        f"MAGE checkpoint (torch.load(f)['model']); empty: ${ENV_VAR}. The tokenizer loads "
        "the same file's vqgan.* keys unless encoder.tokenizer names its own file",
    )
    random_init: bool = param(
        False, "no pretrained weights (tests, tiny runs); the tokenizer too unless it says"
    )
    checkpoint_sha256: str = param(
        "",
        "the sha256 encoder.checkpoint must have (a run that references the file instead of "
        "copying its weights); empty: not checked",
        since="0.2",
    )
    tokenizer: dict[str, Any] = param(
        {},
        "the image tokenizer: {name = 'vqgan', ...its params} (encoder.tokenizer.KEY=VALUE)",
    )
    image_size: int = param(
        256, "images are resized (bicubic, antialiased) to this square size (MAGE: 256)", ge=1
    )
    masking: Literal["none", "mage"] = param(
        "none",
        "'none': one pass over all visible ids (stage 1, the slot branch only); 'mage': a "
        "second, masked pass for the MAGE decoder (Features.masked_tokens)",
    )
    mask_ratio_mean: float = param(0.55, "mean of the truncated Gaussian mask ratio", ge=0, le=1)
    mask_ratio_std: float = param(0.25, "std of the truncated Gaussian mask ratio", gt=0)
    mask_ratio_min: float = param(0.5, "lower end of the mask ratio", ge=0, le=1)
    mask_ratio_max: float = param(1.0, "upper end of the mask ratio", ge=0, le=1)
    drop_ratio: float = param(
        0.5,
        "fraction of positions dropped (removed before the encoder), the lowest-noise part "
        "of the masked ones (MAGE: 0.5 = its mask_ratio_min)",
        ge=0,
        le=1,
    )
    eval_mask_ratio: float = param(
        -1.0,
        "-1: the training schedule in eval too; r in [0, 1]: a fixed ratio in eval",
        ge=-1,
        le=1,
    )
    finetune_from: int = param(
        -1,
        "-1: frozen; b: blocks with index >= b (0-based) and the final norm train (thesis "
        "Table 5.2)",
        ge=-1,
    )
    cache: bool = param(
        False,
        "cache the tokenizer's ids on disk ($OCL_BENCH_CACHE or ~/.cache/ocl-bench/features), "
        "keyed by its weights and a hash of each input image",
    )


# A random tiny MAGE over a random 2-level VQGAN with 32 codes at 32 px (16x16 ids): the
# encoder part of every MAGE-family plugin's conformance run (ocl_bench.testing).
TINY_MAGE_ENCODER: dict[str, Any] = {
    "encoder.name": "mage_vitb16",
    "encoder.random_init": True,
    "encoder.image_size": 32,
    "encoder.embed_dim": 32,
    "encoder.depth": 1,
    "encoder.num_heads": 2,
    "encoder.tokenizer": {
        "name": "vqgan",
        "random_init": True,
        "ch": 8,
        "ch_mult": [1, 2],
        "n_embed": 32,
        "embed_dim": 8,
        "norm_groups": 4,
    },
}


class MageEncoder(nn.Module, Encoder):
    """MAGE ViT-B/16 over VQGAN ids: visible-token features, and a masked pass for MAGE."""

    kind = "encoder"
    name = "mage_vitb16"
    Params = MageParams
    # Two blocks, the second trainable: both the frozen part (stored by hash) and the
    # gradients are checked.
    conformance = {**TINY_MAGE_ENCODER, "encoder.depth": 2, "encoder.finetune_from": 1}
    provides = frozenset(
        {"features.tokens", "features.targets", "features.token_ids", "features.token_mask"}
    )

    @classmethod
    def capabilities(cls, params: MageParams) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        if params.masking == "mage":
            gives |= {"features.kept", "features.masked_tokens"}
        return needs, gives

    def __init__(self, params: MageParams, dims: Dims | None = None):
        super().__init__()
        p = self.params = params
        if p.random_init and p.checkpoint:
            raise ValueError("encoder.checkpoint and encoder.random_init=true exclude each other")
        if p.mask_ratio_min > p.mask_ratio_max:
            raise ValueError(
                f"encoder.mask_ratio_min={p.mask_ratio_min} > mask_ratio_max={p.mask_ratio_max}"
            )
        path = (
            None
            if p.random_init
            else resolve_mage_file(p.checkpoint, p.size, "encoder", p.checkpoint_sha256)
        )
        state = read_state_dict(path, "MAGE checkpoint") if path is not None else {}
        self.tokenizer = self._build_tokenizer(path)
        self.vocab = Vocabulary(self.tokenizer.vocab_size)
        self.grid = self.tokenizer.grid((p.image_size, p.image_size))
        self.num_tokens = self.grid[0] * self.grid[1]
        dim, depth, heads = self._sizes(state)
        self.dim = dim
        self.token_emb = TokenEmbedding(self.vocab.size, dim, 1 + self.num_tokens, p.dropout)
        self.blocks = nn.ModuleList(MageBlock(dim, heads, p.dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_mage_weights(nn.ModuleList([self.blocks, self.norm]))
        if p.finetune_from >= depth:
            raise ValueError(
                f"encoder.finetune_from={p.finetune_from} leaves no trainable block of {depth}"
            )
        self.cache = FeatureCache() if p.cache else None
        self._given_masks: TokenMasks | None = None
        self.weights_source = "random init"
        if path is not None:
            self._load(state, path)
            self.weights_source = str(path)
        self.requires_grad_(False)
        if p.finetune_from >= 0:
            for blk in self.blocks[p.finetune_from :]:
                blk.requires_grad_(True)
            self.norm.requires_grad_(True)
        self.train(self.training)

    # construction -------------------------------------------------------------------------
    def _build_tokenizer(self, path: Path | None) -> ImageTokenizer:
        values = dict(self.params.tokenizer)
        name = values.pop("name", "vqgan")
        if not isinstance(name, str):
            raise ConfigError(f"encoder.tokenizer.name must be a string, got {name!r}")
        own_source = {"checkpoint", "random_init"} & set(values)
        if not own_source:
            if path is None:
                values["random_init"] = True
            else:
                values["checkpoint"] = str(path)
        tokenizer = build_tokenizer(name, values, "encoder.tokenizer")
        tokenizer.requires_grad_(False)
        return tokenizer

    def _sizes(self, state: dict[str, Tensor]) -> tuple[int, int, int]:
        """(width, depth, heads): the params, the size's defaults, or the file's shapes."""
        p = self.params
        dim, depth, heads = SIZES[p.size]
        if state:
            emb = state.get("token_emb.word_embeddings.weight")
            if emb is None:
                raise DataError(
                    "not a MAGE checkpoint: no token_emb.word_embeddings.weight (found e.g. "
                    f"{', '.join(list(state)[:5])})"
                )
            if emb.shape[0] != self.vocab.size:
                raise DataError(
                    f"vocabulary mismatch: the MAGE checkpoint embeds {emb.shape[0]} ids "
                    f"(codebook {emb.shape[0] - NUM_CLASS_IDS - 1} + {NUM_CLASS_IDS} classes + "
                    f"[MASK]), tokenizer '{self.tokenizer.name}' has a codebook of "
                    f"{self.tokenizer.vocab_size} ({self.vocab.size} ids)"
                )
            dim = int(emb.shape[1])
            depth = 1 + max(
                (int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1
            )
            heads = {768: 12, 1024: 16}.get(dim, max(1, dim // 64))
        dim, depth = p.embed_dim or dim, p.depth or depth
        return dim, depth, p.num_heads or heads

    def _load(self, state: dict[str, Tensor], path: Path) -> None:
        part = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
        load_part(
            self, part, ("tokenizer.",), f"the MAGE checkpoint {path} for encoder '{self.name}'"
        )

    # nn.Module ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MageEncoder:
        """Frozen parts always run in eval mode; trainable blocks follow `mode`."""
        super().train(mode)
        self.tokenizer.eval()
        self.token_emb.eval()
        for i, blk in enumerate(self.blocks):
            if not 0 <= self.params.finetune_from <= i:
                blk.eval()
        return self

    @property
    def frozen(self) -> bool:
        return self.params.finetune_from < 0

    def output_dims(self, dims: Dims) -> Dims:
        dims.grid = self.grid
        dims.token_dim = self.dim
        dims.target_dim = self.dim
        dims.vocab_size = self.vocab.codebook_size
        return dims

    def param_groups(self) -> list[dict[str, Any]]:
        """The fine-tuned blocks as one named group (train.lr, like the rest)."""
        trainable = [q for q in self.parameters() if q.requires_grad]
        return [{"params": trainable, "name": "encoder.finetuned"}] if trainable else []

    # the two passes -------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        s = self.params.image_size
        if tuple(images.shape[-2:]) != (s, s):
            images = F.interpolate(
                images, size=(s, s), mode="bicubic", antialias=True, align_corners=False
            ).clamp(0.0, 1.0)
        return images

    @torch.no_grad()
    def token_ids(self, images: Tensor) -> Tensor:
        """long[B,N]: the tokenizer's ids of [0, 1] images, raster order."""
        images = self.preprocess(images)
        cached = getattr(self.tokenizer, "encode_cached", None)
        if self.cache is not None and callable(cached):
            return cached(images, self.cache).flatten(1).long()
        return self.tokenizer.encode(images).flatten(1).long()

    def encode_ids(self, ids: Tensor, kept: Tensor | None = None) -> Tensor:
        """The encoder output [B,1+N',D] for grid ids [B,N] (may hold [MASK]): the class id
        is prepended, all positions are embedded, then only `kept` [B,N'] (ascending grid
        positions) go through the blocks; None keeps all."""
        b = ids.shape[0]
        cls = torch.full((b, 1), self.vocab.fake_class_id, dtype=torch.long, device=ids.device)
        b_from = self.params.finetune_from if self.params.finetune_from >= 0 else len(self.blocks)
        with torch.no_grad():
            x = self.token_emb(torch.cat([cls, ids.long()], 1))
            if kept is not None:
                rows = torch.cat([torch.zeros_like(kept[:, :1]), kept + 1], 1)
                x = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            for blk in self.blocks[:b_from]:
                x = blk(x)[0]
            if self.frozen:
                return self.norm(x)
        for blk in self.blocks[b_from:]:
            x = blk(x)[0]
        return self.norm(x)

    def sample_ratio(self) -> float:
        """The mask ratio of this step: fixed in eval when eval_mask_ratio >= 0, else one draw
        of MAGE's truncated Gaussian (inverse CDF of a torch uniform, so the run's seed
        decides it)."""
        from scipy.stats import truncnorm

        p = self.params
        if not self.training and p.eval_mask_ratio >= 0:
            return float(p.eval_mask_ratio)
        lo = (p.mask_ratio_min - p.mask_ratio_mean) / p.mask_ratio_std
        hi = (p.mask_ratio_max - p.mask_ratio_mean) / p.mask_ratio_std
        u = float(torch.rand(()))
        r = truncnorm.ppf(u, lo, hi, loc=p.mask_ratio_mean, scale=p.mask_ratio_std)
        return float(min(max(r, p.mask_ratio_min), p.mask_ratio_max))

    def sample_mask(self, batch: int, ratio: float, device: torch.device) -> Tensor:
        """uint8[B,N] TokenState: ceil(N ratio) positions masked per image, of which the
        ceil(N drop_ratio) with the lowest noise are dropped (at most all masked ones)."""
        n = self.num_tokens
        num_masked = int(math.ceil(n * ratio))
        num_dropped = min(int(math.ceil(n * self.params.drop_ratio)), num_masked)
        rank = torch.rand(batch, n, device=device).argsort(1).argsort(1)  # 0 = lowest noise
        state = torch.full((batch, n), int(TokenState.VISIBLE), dtype=torch.uint8, device=device)
        state[rank < num_masked] = int(TokenState.MASKED)
        state[rank < num_dropped] = int(TokenState.DROPPED)
        return state

    def masked_pass(self, ids: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """(masked_tokens [B,1+N',D], kept [B,N']) for ids [B,N] under TokenState `state`."""
        masked = state != int(TokenState.VISIBLE)
        inputs = ids.masked_fill(masked, self.vocab.mask_id)
        keep = state != int(TokenState.DROPPED)
        counts = keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every image must keep the same number of positions")
        kept = keep.nonzero()[:, 1].view(ids.shape[0], -1)  # ascending, as MAGE's nonzero
        return self.encode_ids(inputs, kept), kept

    @contextmanager
    def use_masks(self, masks: TokenMasks) -> Iterator[TokenMasks]:
        """Within the block, every forward (also through the model: `model(batch)`) runs
        the masked pass on `masks` instead of drawing them. See TokenMasks for an example."""
        if not isinstance(masks, TokenMasks):
            raise TypeError(f"use_masks needs TokenMasks, got {type(masks).__name__}")
        previous = self._given_masks
        self._given_masks = masks
        try:
            yield masks
        finally:
            self._given_masks = previous

    def forward(self, batch: Batch, masks: TokenMasks | None = None) -> Features:
        """Features of both branches. The masked pass (encoder.masking=mage) runs on
        `masks` when given (else those of an enclosing `use_masks`, else MAGE's draw)."""
        ids = self.token_ids(batch.images)
        tokens = self.encode_ids(ids)[:, 1:]
        state = torch.zeros_like(ids, dtype=torch.uint8)
        features = Features(
            tokens=tokens,
            grid=self.grid,
            targets=tokens.detach(),
            token_ids=ids,
            token_mask=state,
        )
        masks = masks if masks is not None else self._given_masks
        if self.params.masking != "mage":
            if masks is not None:
                raise ConfigError(
                    "given token masks need the masked pass: set encoder.masking=mage"
                )
            return features
        if masks is None:
            state = self.sample_mask(ids.shape[0], self.sample_ratio(), ids.device)
        else:
            if tuple(masks.masked.shape) != tuple(ids.shape):
                raise ValueError(
                    f"TokenMasks of shape {tuple(masks.masked.shape)} do not fit this batch: "
                    f"{ids.shape[0]} images of {self.num_tokens} grid positions"
                )
            state = masks.state().to(ids.device)
        features.masked_tokens, features.kept = self.masked_pass(ids, state)
        features.token_mask = state
        return features


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [MageEncoder]


__all__ = [
    "ENV_VAR",
    "MageAttention",
    "MageBlock",
    "MageEncoder",
    "MageParams",
    "TokenEmbedding",
    "TokenMasks",
    "Vocabulary",
    "init_mage_weights",
    "load_part",
    "resolve_mage_file",
]
