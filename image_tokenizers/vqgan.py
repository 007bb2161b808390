"""Tokenizer plugin "vqgan": MAGE's MaskGIT-style VQGAN (images in [0, 1] <-> token ids).

MAGE (Li et al., CVPR 2023; github.com/LTH14/mage) tokenizes 256x256 images into a 16x16
grid over a 1024-entry codebook with a VQGAN ported from MaskGIT's JAX code, kept in the
repository's `taming/` folder but *not* taming's architecture
(../shared/reference/spot-and-mage.md, section g). What makes it MaskGIT's:

- input in [0, 1], no mean/std normalisation;
- no attention blocks (`attn_resolutions` in the official config is ignored);
- encoder downsampling is a 2x2 average pool (no parameters); the decoder upsamples with
  nearest x2 + a 3x3 conv;
- residual blocks have no timestep embedding, their 3x3 convs have no bias, and when the
  channel count changes the shortcut is a 1x1 conv out->out applied to the *branch
  output*: `nin_shortcut(h) + h`, not `nin_shortcut(x) + h`;
- the encoder's conv_in has no bias; there is no quant_conv / post_quant_conv, so the
  encoder's output is quantised directly (z_channels == embed_dim);
- the quantiser is taming's VectorQuantizer2: plain L2 nearest codebook entry.

The module attribute names reproduce the official state-dict keys exactly (`encoder.*`,
`decoder.*`, `quantize.embedding.weight`: 168 tensors at the official sizes), so the
official `vqgan_jax_strongaug.ckpt` and the `vqgan.*` keys of a MAGE checkpoint load
strictly, with the sizes read from the tensors. The tokenizer is always frozen and in
eval mode. `decode` clamps its images to [0, 1] where the official decode does not
(param `clamp`, default true; `clamp=false` gives the official, unclamped values).
`encode_cached` stores token ids in the feature cache (bench/run/feature_cache.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.runtime import autocast_dtype
from ocl_bench.api.tokenizing import ImageTokenizer
from ocl_bench.api.weights import read_state_dict, state_sha256, strict_load, torch_hub_checkpoint
from ocl_bench.encoders.mage import TINY_MAGE_ENCODER
from ocl_bench.run.feature_cache import FeatureCache, sample_ids

ENV_VAR = "OCL_BENCH_VQGAN"
OFFICIAL_FILE = "vqgan_jax_strongaug.ckpt"
WHERE_TO_GET = (
    "the Google Drive link in the README of github.com/LTH14/mage (section 'Preparation')"
)
# Inside a MAGE checkpoint's "model" dict the tokenizer's keys carry this prefix.
MAGE_PREFIX = "vqgan."
# Bumped whenever what `encode` computes from an image changes (invalidates cached ids).
ENCODE_VERSION = "maskgit-vqgan-l2-argmin|v1"


@dataclass(frozen=True)
class VQGANParams:
    checkpoint: str = param(
        "",
        f"the official {OFFICIAL_FILE} or a MAGE checkpoint (its vqgan.* keys); empty: "
        f"${ENV_VAR}, else the torch.hub cache. Sizes are read from the file",
    )
    random_init: bool = param(False, "no pretrained weights (tests, tiny runs)")
    n_embed: int = param(1024, "codebook entries (the vocabulary); read from a checkpoint", ge=1)
    embed_dim: int = param(
        256, "codebook vector width (= z_channels: there is no quant_conv)", ge=1
    )
    ch: int = param(128, "base channel count (encoder conv_in output)", ge=1)
    ch_mult: tuple[int, ...] = param(
        (1, 1, 2, 2, 4),
        "channel multiplier per resolution level; the image side shrinks by 2^(len(ch_mult) - 1)",
    )
    num_res_blocks: int = param(2, "residual blocks per level (encoder and decoder)", ge=1)
    norm_groups: int = param(
        32, "GroupNorm groups (official 32; smaller only for tiny test models)", ge=1
    )
    clamp: bool = param(
        True,
        "decode clamps images to [0, 1]. The official VQModel.decode does not (its "
        "gen_img_uncond.py clips only when it writes 8-bit PNGs): false returns its raw output",
        since="0.2",
    )


# Sizes that a checkpoint fixes; each is read from the tensors when one is loaded.
SIZE_FIELDS = ("n_embed", "embed_dim", "ch", "ch_mult", "num_res_blocks")


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, all convs bias-free.

    When channels change, the official block returns `nin_shortcut(h) + h` (a MaskGIT
    quirk: the 1x1 conv maps out->out and is applied to the branch, the input x is
    discarded); otherwise `x + h`.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (
            nn.Conv2d(out_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # official dropout is 0.0
        if self.nin_shortcut is not None:
            return self.nin_shortcut(h) + h
        return x + h


def _level(blocks: list[ResnetBlock]) -> nn.Module:
    # A bare container so the keys read `down.i.block.j...` / `up.i.block.j...`.
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    return level


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (with bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> latents [B, z_channels, H/2^L, W/2^L]."""

    def __init__(self, p: VQGANParams):
        super().__init__()
        g = p.norm_groups
        self.conv_in = nn.Conv2d(3, p.ch, 3, padding=1, bias=False)
        channels = p.ch
        self.down = nn.ModuleList()
        for mult in p.ch_mult:
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(channels, p.ch * mult, g))
                channels = p.ch * mult
            self.down.append(_level(blocks))
        self.mid = _mid(channels, g)
        self.norm_out = nn.GroupNorm(g, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, p.embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != last:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Codebook vectors [B, embed_dim, h, w] -> images [B, 3, h*2^L, w*2^L] (unclamped)."""

    def __init__(self, p: VQGANParams):
        super().__init__()
        g = p.norm_groups
        channels = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.embed_dim, channels, 3, padding=1)
        self.mid = _mid(channels, g)
        levels: list[nn.Module] = []
        for i in reversed(range(len(p.ch_mult))):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(channels, p.ch * p.ch_mult[i], g))
                channels = p.ch * p.ch_mult[i]
            level = _level(blocks)
            if i != 0:
                level.upsample = Upsample(channels)
            levels.insert(0, level)  # up[i] is level i, as in the official key names
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """The codebook; `nearest` is VectorQuantizer2's L2 argmin."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # The official init (irrelevant once weights load; keeps random tokenizers alike).
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, z: Tensor) -> Tensor:
        """Ids [B, h, w] of the nearest codebook entries of latents z [B, C, h, w]."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.embedding.weight
        # Same expression, in the same order, as the official code, so near-ties break
        # the same way: |z|^2 + |e|^2 - 2 z.e
        d = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(codes**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, codes.t())
        )
        return torch.argmin(d, dim=1).reshape(b, h, w)


def infer_sizes(state: Mapping[str, Tensor], source: str) -> dict[str, object]:
    """n_embed, embed_dim, ch, ch_mult, num_res_blocks from official-layout tensors."""
    needed = (
        "encoder.conv_in.weight",
        "quantize.embedding.weight",
        "encoder.down.0.block.0.conv1.weight",
    )
    absent = [k for k in needed if k not in state]
    if absent:
        sample = ", ".join(sorted(state)[:5]) or "no tensors"
        raise DataError(
            f"{source} is not a MaskGIT/MAGE VQGAN checkpoint: no {', '.join(absent)} "
            f"(expected {OFFICIAL_FILE} or a MAGE checkpoint with vqgan.* keys; "
            f"found {sample}, ...)"
        )
    n_embed, embed_dim = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    ch_mult = []
    while f"encoder.down.{len(ch_mult)}.block.0.conv1.weight" in state:
        out = state[f"encoder.down.{len(ch_mult)}.block.0.conv1.weight"].shape[0]
        if out % ch:
            raise DataError(
                f"{source}: level {len(ch_mult)} has {out} channels, not a multiple of {ch}"
            )
        ch_mult.append(out // ch)
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in state:
        blocks += 1
    return {
        "n_embed": int(n_embed),
        "embed_dim": int(embed_dim),
        "ch": int(ch),
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": blocks,
    }


def _taming_hint(state: Mapping[str, Tensor]) -> str:
    """A note for taming-transformers' VQGAN files, which share the key prefixes (LTH14/mage#21)."""
    if "quant_conv.weight" in state or any(".attn." in k for k in state):
        return (
            " (quant_conv/attention keys: this is a taming-transformers VQGAN, not MAGE's "
            f"MaskGIT-style one; use {OFFICIAL_FILE})"
        )
    return ""


def vqgan_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tokenizer's own keys: the `vqgan.*` ones of a MAGE checkpoint, else all."""
    if any(k.startswith(MAGE_PREFIX) for k in state):
        return {k[len(MAGE_PREFIX) :]: v for k, v in state.items() if k.startswith(MAGE_PREFIX)}
    return dict(state)


class VQGANTokenizer(ImageTokenizer):
    """MAGE's MaskGIT-style VQGAN: 256px images in [0, 1] <-> 16x16 ids over 1024 codes.

    Official weights: vqgan_jax_strongaug.ckpt (MAGE README, Google Drive).
    """

    name = "vqgan"
    Params = VQGANParams
    # Owned by the tiny MAGE encoder (no pretrained file in tests).
    conformance = TINY_MAGE_ENCODER
    trainable = False

    def __init__(self, params: VQGANParams):
        p = params
        if p.random_init and p.checkpoint:
            raise ConfigError("tokenizer: checkpoint and random_init=true exclude each other")
        state: dict[str, Tensor] | None = None
        path: Path | None = None
        if not p.random_init:
            path = self.resolve_checkpoint(p)
            state = vqgan_state(read_state_dict(path))
            p = self._sizes_from(p, infer_sizes(state, str(path)), str(path))
        if not p.ch_mult:
            raise ConfigError("tokenizer.ch_mult needs at least one level")
        for c in {p.ch * m for m in p.ch_mult}:
            if c % p.norm_groups:
                raise ConfigError(
                    f"tokenizer: {c} channels do not divide into norm_groups={p.norm_groups}"
                )
        super().__init__(p)
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)
        self.quantize = Quantizer(p.n_embed, p.embed_dim)
        self.vocab_size = p.n_embed
        self.downsample = 2 ** (len(p.ch_mult) - 1)
        self.weights_source = "random init" if path is None else str(path)
        if state is not None:
            strict_load(self, state, f"{path} for tokenizer 'vqgan'", _taming_hint(state))
        self.requires_grad_(False)
        self.eval()
        self._weights_hash: str | None = None

    # weights ------------------------------------------------------------------------------
    @staticmethod
    def resolve_checkpoint(p: VQGANParams) -> Path:
        """The weights file to read, or a one-line DataError naming what to download."""
        if p.checkpoint:
            path = Path(p.checkpoint).expanduser()
            if not path.is_file():
                raise DataError(
                    f"tokenizer.checkpoint: file not found: {path} (expected {OFFICIAL_FILE} "
                    f"from {WHERE_TO_GET}, or a MAGE checkpoint)"
                )
            return path
        env = os.environ.get(ENV_VAR, "")
        if env:
            path = Path(env).expanduser()
            if not path.is_file():
                raise DataError(f"{ENV_VAR}={env}: file not found (expected {OFFICIAL_FILE})")
            return path
        hub = torch_hub_checkpoint(OFFICIAL_FILE)
        if hub.is_file():
            return hub
        raise DataError(
            f"no VQGAN weights: download {OFFICIAL_FILE} from {WHERE_TO_GET} and pass it as "
            f"tokenizer.checkpoint=PATH or in ${ENV_VAR} (a MAGE checkpoint works too); also "
            f"looked in {hub}. Use random_init=true for a run without pretrained weights"
        )

    @staticmethod
    def _sizes_from(p: VQGANParams, found: dict[str, object], source: str) -> VQGANParams:
        """`p` with the file's sizes; a size the user changed from its default must agree."""
        defaults = VQGANParams()
        for f in fields(VQGANParams):
            if f.name not in SIZE_FIELDS:
                continue
            asked, default = getattr(p, f.name), getattr(defaults, f.name)
            if asked != default and asked != found[f.name]:
                what = "vocabulary mismatch: " if f.name == "n_embed" else ""
                raise DataError(
                    f"{what}tokenizer.{f.name}={asked} but {source} has {found[f.name]}; "
                    "drop the override (sizes are read from the file)"
                )
        return replace(p, **found)

    def weights_hash(self) -> str:
        """sha256 of the weights that compute the ids (file, random init or restored)."""
        if self._weights_hash is None:
            self._weights_hash = state_sha256(self)
        return self._weights_hash

    # nn.Module ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> VQGANTokenizer:
        """Always eval: the tokenizer is frozen (GroupNorm only, but keep it explicit)."""
        return super().train(False)

    # the tokenizer contract ---------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Token ids [B, h, w] (int64) of images [B, 3, H, W] in [0, 1]."""
        self.grid(tuple(images.shape[-2:]))
        with torch.no_grad():
            return self.quantize.nearest(self.encoder(images))

    def embed(self, ids: Tensor) -> Tensor:
        """Codebook vectors [B, embed_dim, h, w] of ids [B, h, w]."""
        if ids.dim() != 3:
            raise ValueError(f"vqgan.embed: ids must be [B, h, w], got {tuple(ids.shape)}")
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.vocab_size:
            # Typically a model's special id ([MASK], a class id) reaching the codebook.
            raise ValueError(
                f"vqgan.embed: ids must lie in [0, {self.vocab_size}), got "
                f"{int(ids.min())}..{int(ids.max())}"
            )
        return self.quantize.embedding(ids).permute(0, 3, 1, 2).contiguous()

    def decode(self, ids: Tensor, *, clamp: bool | None = None) -> Tensor:
        """Images [B, 3, H, W] from ids [B, h, w], clamped to [0, 1] unless `clamp` (default
        the `clamp` param, true) is false.

        The official decode (taming's VQModel.decode_code in LTH14/mage) does not clamp:
        its values run slightly outside [0, 1]. `clamp=False` gives them unchanged, e.g. to
        compare with the official output; the clamped images are what metrics and saved
        figures need."""
        clamp = self.params.clamp if clamp is None else clamp
        with torch.no_grad():
            out = self.decoder(self.embed(ids))
        return out.clamp(0.0, 1.0) if clamp else out

    # cached ids ---------------------------------------------------------------------------
    def cache_key(self, cache: FeatureCache, images: Tensor) -> str:
        """The cache key of ids computed from `images`: weights, sizes and runtime."""
        p = self.params
        return cache.key(
            tokenizer=self.name,
            weights=self.weights_hash(),
            sizes=[p.n_embed, p.embed_dim, p.ch, list(p.ch_mult), p.num_res_blocks, p.norm_groups],
            image_size=list(images.shape[-2:]),
            encode=ENCODE_VERSION,
            torch=torch.__version__,
            device=images.device.type,
            autocast=autocast_dtype(images.device),
        )

    def encode_cached(self, images: Tensor, cache: FeatureCache | None) -> Tensor:
        """`encode`, reading and writing ids per image in `cache` (None: no cache).

        Ids are stored as int16 when the vocabulary fits (2 bytes a token: 512 bytes per
        256-token image) and returned as int64 on the images' device.
        """
        if cache is None:
            return self.encode(images)
        ids = sample_ids(images)
        key = self.cache_key(cache, images)
        found = cache.lookup(key, ids)
        missing = [i for i, sid in enumerate(ids) if sid not in found]
        if missing:
            rows = torch.tensor(missing, device=images.device)
            computed = self.encode(images[rows])
            store = torch.int16 if self.vocab_size <= torch.iinfo(torch.int16).max else torch.int64
            cache.put(key, [ids[i] for i in missing], computed.to(store))
            for j, i in enumerate(missing):
                found[ids[i]] = computed[j]
        return torch.stack([found[sid].to(images.device, torch.int64) for sid in ids])


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [VQGANTokenizer]


__all__ = [
    "ENV_VAR",
    "OFFICIAL_FILE",
    "VQGANParams",
    "VQGANTokenizer",
    "infer_sizes",
    "vqgan_state",
]
