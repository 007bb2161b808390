"""Pretrained ViT encoders through timm: DINO and DINOv2 patch tokens (DINOSAUR, SPOT).

One implementation, one plugin name per pretrained model (the `PRETRAINED` table below).
The encoder resizes the [0, 1] images to `image_size` (bicubic, antialiased), applies the
ImageNet mean/std (or mean = std = 0.5 with `normalize = "half"`, what SlotDiffusion feeds
DINO), runs the ViT up to `block` (later blocks are dropped), optionally
applies the final LayerNorm, and drops the CLS and register tokens. `targets` are the
same frozen tokens, what feature-reconstruction decoders (DINOSAUR) reproduce; with
`finetune_from >= 0` the tokens come from the partly trainable encoder and the targets
from a frozen copy of the original (SPOT stage 2).

Weights come from, in order: `encoder.weights` (a local file), the environment variable
OCL_BENCH_WEIGHTS_<NAME>, timm's weights in the local Hugging Face cache, the official
file in the torch.hub cache. Nothing is downloaded. The official files (DINO and DINOv2
`torch.hub` releases) load as they are: a "teacher."/"module."/"backbone." prefix is
stripped, the DINOv2 layout is converted by timm, and the position embedding is
resampled to `image_size`; then every key must match.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Dims, Features
from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Encoder
from ocl_bench.api.runtime import autocast_dtype
from ocl_bench.api.weights import (
    cached_hf_file,
    hf_hub_cache_dir,
    read_state_dict,
    state_sha256,
    strict_load,
    strip_wrappers,
    torch_hub_checkpoint,
)
from ocl_bench.run.feature_cache import FeatureCache, sample_ids

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# encoder.normalize -> (mean, std) per channel. "half" maps [0, 1] to [-1, 1]: SlotDiffusion's
# loaders normalise with Normalize(0.5, 0.5) (img_based/datasets/coco_transforms.py,
# voc_transforms.py) and its DINOEncoder runs ViTModel on those images unchanged
# (video_based/models/dino.py), so its slot attention learned on tokens of such inputs.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# Bumped whenever what the encoder computes from an image changes (invalidates caches).
PREPROCESS = "resize-bicubic-antialias-clamp01|imagenet-mean-std|v1"


@dataclass(frozen=True)
class PretrainedViT:
    """One pretrained model: its timm name and the official release file."""

    timm_name: str
    url: str
    label: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hf_repo(self) -> str:
        return f"timm/{self.timm_name}"


_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
PRETRAINED: dict[str, PretrainedViT] = {
    "dino_vits16": PretrainedViT(
        "vit_small_patch16_224.dino",
        f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "DINO ViT-S/16",
    ),
    "dino_vitb16": PretrainedViT(
        "vit_base_patch16_224.dino",
        f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "DINO ViT-B/16",
    ),
    "dino_vits8": PretrainedViT(
        "vit_small_patch8_224.dino",
        f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        "DINO ViT-S/8",
    ),
    "dinov2_vits14": PretrainedViT(
        "vit_small_patch14_dinov2.lvd142m",
        f"{_DINOV2}/dinov2_vits14/dinov2_vits14_pretrain.pth",
        "DINOv2 ViT-S/14",
    ),
    "dinov2_vitb14": PretrainedViT(
        "vit_base_patch14_dinov2.lvd142m",
        f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        "DINOv2 ViT-B/14",
    ),
    "dinov2_vits14_reg": PretrainedViT(
        "vit_small_patch14_reg4_dinov2.lvd142m",
        f"{_DINOV2}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
        "DINOv2 ViT-S/14 with 4 registers",
    ),
    "dinov2_vitb14_reg": PretrainedViT(
        "vit_base_patch14_reg4_dinov2.lvd142m",
        f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
        "DINOv2 ViT-B/14 with 4 registers",
    ),
}


@dataclass(frozen=True)
class ViTParams:
    weights: str = param(
        "",
        "local weights file (.safetensors, or .pth/.bin read weights-only); empty: env var "
        "OCL_BENCH_WEIGHTS_<NAME>, else timm's weights in the local HF cache, else the "
        "official file in the torch.hub cache",
    )
    block: int = param(
        12,
        "patch tokens from the output of this block (1-based); later blocks are dropped. "
        "Capped at encoder.depth when depth is overridden",
        ge=1,
    )
    final_norm: bool = param(False, "apply the final LayerNorm (DINOSAUR and SPOT do not)")
    finetune_from: int = param(
        -1,
        "-1: frozen; b: blocks with index >= b (0-based) train, the rest stays frozen and a "
        "frozen copy gives the targets (SPOT stage 2 uses 8)",
        ge=-1,
    )
    image_size: int = param(
        224, "images are resized (bicubic, antialiased) to this square size", ge=1
    )
    random_init: bool = param(False, "no pretrained weights at all (tests, tiny runs)")
    embed_dim: int = param(
        0, "override the token width (tiny test models); 0 = the model's own", ge=0
    )
    depth: int = param(0, "override the number of blocks; 0 = the model's own", ge=0)
    num_heads: int = param(0, "override the number of attention heads; 0 = the model's own", ge=0)
    frozen_precision: Literal["fp32", "bf16", "fp16"] = param(
        "fp32",
        "autocast dtype of the frozen ViT's forward (its tokens are returned as fp32): bf16 on"
        " CPU or GPU, fp16 on GPU only; on GPU this roughly halves the frozen encoder's time,"
        " at a relative error of about 1e-2 in the tokens (fp32 is what SPOT computes)",
    )
    cache: bool = param(
        False,
        "cache the frozen features on disk ($OCL_BENCH_CACHE or ~/.cache/ocl-bench/features), "
        "keyed by weights, settings and a hash of each input image",
    )
    normalize: Literal["imagenet", "half"] = param(
        "imagenet",
        "input normalisation: 'imagenet' (the ImageNet mean/std DINO and DINOv2 were trained "
        "with) or 'half' (mean = std = 0.5, images in [-1, 1]: what SlotDiffusion feeds DINO)",
        since="0.2",
    )


def _embed(vit: nn.Module, x: Tensor) -> Tensor:
    """Patch embedding, prefix tokens and position embedding: timm's own pre-block steps."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


# A random 1-block ViT-S/16 of width 32 at 32 px: the encoder of the conformance runs of
# the plugins that read ViT features (SPOT's decoder and objectives; ocl_bench.testing).
TINY_VIT_ENCODER: dict[str, Any] = {
    "encoder.name": "dino_vits16",
    "encoder.random_init": True,
    "encoder.image_size": 32,
    "encoder.embed_dim": 32,
    "encoder.depth": 1,
    "encoder.num_heads": 2,
}


class ViTEncoder(nn.Module, Encoder):
    """A pretrained timm ViT; patch tokens of one block (CLS and registers removed)."""

    kind = "encoder"
    Params = ViTParams
    # Random weights (tests have no pretrained files): 2 blocks of width 32 at 112 px, a
    # whole number of 8, 14 and 16 px patches; the second block trains, so both the
    # frozen part (stored by hash) and the gradients are checked. The MLP decoder
    # reconstructs the features (DINOSAUR), whatever the patch size.
    conformance = {
        "encoder.random_init": True,
        "encoder.image_size": 112,
        "encoder.embed_dim": 32,
        "encoder.depth": 2,
        "encoder.num_heads": 2,
        "encoder.finetune_from": 1,
        "decoder.target": "features",
    }
    provides = frozenset({"features.tokens", "features.targets"})
    pretrained: ClassVar[PretrainedViT]

    def __init__(self, params: ViTParams, dims: Dims | None = None):
        super().__init__()
        p = self.params = params
        if p.image_size < 1:
            raise ValueError(f"encoder.image_size must be positive, got {p.image_size}")
        if p.finetune_from < -1:
            raise ValueError(
                f"encoder.finetune_from must be -1 or a block index, got {p.finetune_from}"
            )
        if p.random_init and p.weights:
            raise ValueError("encoder.weights and encoder.random_init=true exclude each other")
        vit = self._create()
        depth = len(vit.blocks)
        block = min(p.block, depth) if p.depth else p.block
        if not 1 <= block <= depth:
            raise ValueError(f"encoder.block must be in 1..{depth}, got {p.block}")
        if p.finetune_from >= block:
            raise ValueError(
                f"encoder.finetune_from={p.finetune_from} leaves no trainable block among the "
                f"{block} kept; use -1 for a frozen encoder"
            )
        self.block = block
        self.weights_source = "random init"
        if not p.random_init:
            path = self.resolve_weights()
            self.weights_source = str(path)
            self.load_weights(vit, path)
        vit.blocks = vit.blocks[:block]
        if not p.final_norm:
            vit.norm = nn.Identity()
        vit.requires_grad_(False)
        self.vit = vit
        self.target_vit: nn.Module | None = None
        if p.finetune_from >= 0:
            self.target_vit = copy.deepcopy(vit)  # the original: frozen targets
            for blk in vit.blocks[p.finetune_from :]:
                blk.requires_grad_(True)
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.dim = int(vit.embed_dim)
        mean, std = NORMALIZATIONS[p.normalize]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), False)
        self.cache = FeatureCache() if p.cache else None
        self._weights_hash: str | None = None
        self.train(self.training)

    # construction -------------------------------------------------------------------------
    def _create(self) -> nn.Module:
        import timm

        p, name = self.params, self.pretrained.timm_name
        overrides = {
            k: v
            for k, v in (("embed_dim", p.embed_dim), ("depth", p.depth), ("num_heads", p.num_heads))
            if v
        }
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=0, img_size=p.image_size, **overrides
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise DataError(
                    f"timm {timm.__version__} does not know '{name}'; upgrade timm"
                ) from None
            raise

    @classmethod
    def env_var(cls) -> str:
        return f"OCL_BENCH_WEIGHTS_{cls.name.upper()}"

    def resolve_weights(self) -> Path:
        """The local weights file to load, or DataError naming what was looked for."""
        pre = self.pretrained
        if self.params.weights:
            path = Path(self.params.weights).expanduser()
            if not path.is_file():
                raise DataError(f"encoder.weights: file not found: {path}")
            return path
        env = os.environ.get(self.env_var(), "")
        if env:
            path = Path(env).expanduser()
            if not path.is_file():
                raise DataError(f"{self.env_var()}={env}: file not found")
            return path
        found = cached_hf_file(pre.hf_repo, ("model.safetensors", "pytorch_model.bin"))
        if found is not None:
            return found
        hub = torch_hub_checkpoint(pre.filename)
        if hub.is_file():
            return hub
        raise DataError(
            f"no weights for encoder '{self.name}' (timm model '{pre.timm_name}'): download "
            f"the official file {pre.filename} ({pre.url}) and pass it as encoder.weights=PATH "
            f"or in the env var {self.env_var()}; looked in the Hugging Face cache "
            f"({hf_hub_cache_dir()}, repo {pre.hf_repo}) and the torch.hub cache ({hub}). "
            "Use encoder.random_init=true for a run without pretrained weights"
        )

    def load_weights(self, vit: nn.Module, path: Path) -> None:
        """Load an official or timm-layout checkpoint into `vit`, strictly."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        state, dropped = strip_wrappers(read_state_dict(path))
        try:
            # timm's own conversion: DINOv2 release layout, position-embedding resampling.
            state = checkpoint_filter_fn(state, vit)
        except Exception as err:  # malformed tensors (e.g. a pos_embed that is no grid)
            raise DataError(f"weights {path} cannot be converted for {self.name}: {err}") from None
        note = f" (ignored {len(dropped)} keys outside the backbone)" if dropped else ""
        strict_load(vit, state, f"{path} for encoder '{self.name}'", note)

    # nn.Module ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ViTEncoder:
        """The ViTs always run in eval mode (as SPOT's forward_encoder does)."""
        super().train(mode)
        self.vit.eval()
        if self.target_vit is not None:
            self.target_vit.eval()
        return self

    @property
    def frozen(self) -> bool:
        return self.params.finetune_from < 0

    def output_dims(self, dims: Dims) -> Dims:
        dims.grid = self.grid
        dims.token_dim = self.dim
        dims.target_dim = self.dim
        return dims

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] images -> resized to image_size, normalised (encoder.normalize)."""
        s = self.params.image_size
        x = images
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # as resizing 8-bit images would
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @staticmethod
    def run_frozen(vit: nn.Module, x: Tensor) -> Tensor:
        """Patch tokens of a frozen ViT on preprocessed images, without autograd."""
        with torch.no_grad():
            x = _embed(vit, x)
            for blk in vit.blocks:
                x = blk(x)
            x = vit.norm(x)
        return x[:, vit.num_prefix_tokens :]

    def run_finetuned(self, x: Tensor) -> Tensor:
        """Patch tokens with gradients through blocks finetune_from.. only."""
        b, vit = self.params.finetune_from, self.vit
        with torch.no_grad():
            x = _embed(vit, x)
            for blk in vit.blocks[:b]:
                x = blk(x)
        for blk in vit.blocks[b:]:
            x = blk(x)
        x = vit.norm(x)
        return x[:, vit.num_prefix_tokens :]

    def forward(self, batch: Batch) -> Features:
        images = batch.images
        if self.frozen:
            tokens = self.frozen_tokens(images)
            return Features(tokens=tokens, grid=self.grid, targets=tokens)
        tokens = self.run_finetuned(self.preprocess(images))
        return Features(tokens=tokens, grid=self.grid, targets=self.frozen_tokens(images))

    # frozen features and their cache -----------------------------------------------------
    @property
    def frozen_vit(self) -> nn.Module:
        return self.vit if self.target_vit is None else self.target_vit

    def compute_frozen(self, images: Tensor) -> Tensor:
        """The frozen network's tokens, computed at encoder.frozen_precision (fp32 out)."""
        x = self.preprocess(images)
        precision = self.params.frozen_precision
        if precision == "fp32":
            return self.run_frozen(self.frozen_vit, x)
        if precision == "fp16" and x.device.type != "cuda":
            raise ConfigError("encoder.frozen_precision='fp16' needs CUDA; use 'bf16' or 'fp32'")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(x.device.type, dtype=dtype):
            tokens = self.run_frozen(self.frozen_vit, x)
        return tokens.float()

    def frozen_tokens(self, images: Tensor) -> Tensor:
        """The frozen network's tokens, from the feature cache where it has them."""
        if self.cache is None:
            return self.compute_frozen(images)
        ids = sample_ids(images)
        key = self.cache_key(images.device)
        found = self.cache.lookup(key, ids)
        missing = [i for i, sid in enumerate(ids) if sid not in found]
        if missing:
            rows = torch.tensor(missing, device=images.device)
            computed = self.compute_frozen(images[rows])
            self.cache.put(key, [ids[i] for i in missing], computed)
            for j, i in enumerate(missing):
                found[ids[i]] = computed[j]
        dtype = next(iter(found.values())).dtype
        return torch.stack([found[sid].to(images.device, dtype) for sid in ids])

    def weights_hash(self) -> str:
        """sha256 of the frozen network's parameters: what actually computes the features.

        Exact for pretrained files (whatever their format), random init and weights
        restored from a run checkpoint alike; computed once per encoder.
        """
        if self._weights_hash is None:
            self._weights_hash = state_sha256(self.frozen_vit)
        return self._weights_hash

    def cache_key(self, device: torch.device) -> str:
        import timm

        assert self.cache is not None
        p = self.params
        return self.cache.key(
            encoder=self.name,
            timm_model=self.pretrained.timm_name,
            weights=self.weights_hash(),
            block=self.block,
            final_norm=p.final_norm,
            image_size=p.image_size,
            arch=[self.dim, len(self.frozen_vit.blocks), self.frozen_vit.blocks[0].attn.num_heads],
            preprocess=PREPROCESS,
            timm=timm.__version__,
            torch=torch.__version__,
            device=device.type,
            autocast=autocast_dtype(device),
            # only when set, so fp32 caches written before the setting existed stay valid
            **({"frozen_precision": p.frozen_precision} if p.frozen_precision != "fp32" else {}),
            **({"normalize": p.normalize} if p.normalize != "imagenet" else {}),
        )


def _make(name: str, pre: PretrainedViT) -> type[ViTEncoder]:
    doc = (
        f"{pre.label} (timm {pre.timm_name}): patch tokens of one block, CLS"
        f"{' and registers' if 'reg' in pre.timm_name else ''} removed.\n\n"
        f"Official weights: {pre.url}"
    )
    cls_name = "".join(part.capitalize() for part in name.split("_")) + "Encoder"
    return type(
        cls_name,
        (ViTEncoder,),
        {"name": name, "pretrained": pre, "__doc__": doc, "__module__": __name__},
    )


ENCODERS: dict[str, type[ViTEncoder]] = {name: _make(name, pre) for name, pre in PRETRAINED.items()}
globals().update({cls.__name__: cls for cls in ENCODERS.values()})


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return list(ENCODERS.values())


__all__ = ["ENCODERS", "PRETRAINED", "PretrainedViT", "ViTEncoder", "ViTParams"]
