"""Importer plugin "slotdiffusion": a released SlotDiffusion model as a run directory.

`ocl-bench import slotdiffusion pretrained/sa_ldm_dino_coco_params-res224.pth --out RUN_DIR
[overrides]` reads a trained SlotDiffusion image model (github Wuziyi616/SlotDiffusion,
`SADiffusion` of slotdiffusion/img_based/models/sa_diffusion.py, as its `pretrained.zip`
ships it: a state_dict, bare or under "state_dict") into a run of the `slotdiffusion-coco`
or `slotdiffusion-voc` preset (`importer.preset`, default from the file name) that
`ocl-bench eval RUN_DIR` scores. Sizes come from the tensor shapes; the diffusion schedule
from the file's own `betas`.

Official layout -> ours:

    encoder.dino.*  (transformers ViTModel, frozen)  -> dropped: the encoder plugin
                                                        (dino_vits8) loads DINO ViT-S/8
    encoder_pos_embedding.dense                      -> grouping.pos_proj (position
                                                        'linspace'; its grid buffer is
                                                        checked to be that grid, dropped)
    encoder_out_layer.{0, 1, 3}                      -> grouping.pre_mlp.0, pre_mlp.1.{0, 2}
                                                        (pre_mlp_hidden = pre_mlp_out = E)
    init_latents [1, K, D]                           -> grouping.queries [K, D]
    slot_attention.norm_inputs                       -> grouping.norm_inputs
    slot_attention.project_q.{0, 1}                  -> grouping.norm_slots, to_q
    slot_attention.project_{k, v}, gru               -> grouping.to_{k, v}, gru
    slot_attention.mlp.{0, 1, 3}                     -> grouping.norm_mlp, update_mlp.{0, 2}
    dm_decoder.model.diffusion_model.* (LDM UNet)    -> decoder.unet.* (diffusers;
                                                        `ldm_unet_to_diffusers`)
    dm_decoder.vae.vqvae.* (taming VQ-VAE)           -> decoder.vqvae.model.* (diffusers
                                                        VQModel; slotdiffusion_vqvae's
                                                        `official_to_diffusers`)
    dm_decoder.{betas, alphas_bar, ...} buffers      -> checked against the decoder's
                                                        schedule, dropped
    dm_decoder.model_ema.* (configs with use_ema)    -> dropped (the released image
                                                        configs train without EMA)

Not in the shapes, so from the preset unless overridden: the slot-attention iterations (3)
and eps (1e-6), the UNet's channels per head (`decoder.head_channels`, 32) and GroupNorm
groups (32). `decoder.null_slots` (ocl-bench's classifier-free-guidance null condition,
unused at guidance 1 as the official sampler) keeps its init.

DINO's input: SlotDiffusion's loaders normalise images with mean = std = 0.5
(datasets/coco_transforms.py, voc_transforms.py: Normalize(0.5, 0.5)) and feed them to DINO
as they are (video_based/models/dino.py): the run sets `encoder.normalize = "half"`, as the
presets do, so the imported slot attention sees the tokens it was trained on.

Evaluation protocol: the run names `protocol = "slotdiffusion"` (protocols/slotdiffusion.toml:
test_seg.py on SlotDiffusion's COCO/VOC loaders: cv2 short-side resize and centre crop, masks
at the input size (mask_size 0 -> 224), crowd dropped, overlap pixels ignored, ...), applied
when the config resolves; an override that contradicts it is refused. `protocol=NAME` on the
command line names another (`protocol=` or `importer.protocol=false`: none, the preset's own
dataset and task settings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.image_tokenizers.slotdiffusion_vqvae import official_to_diffusers
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import apply_overrides, load_raw, resolve
from ocl_bench.run.data import make_dataset
from ocl_bench.run.importing import (
    CheckpointImporter,
    ImportResult,
    check_keys,
    dim_of,
    indices_under,
    load_strict,
    name_protocol,
    protocol_note,
    read_state_dict,
    set_unless_overridden,
)

WHAT = "a SlotDiffusion model checkpoint (sa_ldm_*_params-res*.pth)"
UNET = "dm_decoder.model.diffusion_model."
VQVAE = "dm_decoder.vae.vqvae."
EMA = "dm_decoder.model_ema."
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_bar",
    "alphas_bar_prev",
    "sqrt_alphas_bar",
    "sqrt_one_minus_alphas_bar",
    "log_one_minus_alphas_bar",
    "sqrt_recip_alphas_bar",
    "sqrt_recipm1_alphas_bar",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
SLOT_ATTENTION = {  # official prefix -> ours
    "encoder_pos_embedding.dense.": "grouping.pos_proj.",
    "encoder_out_layer.0.": "grouping.pre_mlp.0.",
    "encoder_out_layer.1.": "grouping.pre_mlp.1.0.",
    "encoder_out_layer.3.": "grouping.pre_mlp.1.2.",
    "slot_attention.norm_inputs.": "grouping.norm_inputs.",
    "slot_attention.project_q.0.": "grouping.norm_slots.",
    "slot_attention.project_q.1.": "grouping.to_q.",
    "slot_attention.project_k.": "grouping.to_k.",
    "slot_attention.project_v.": "grouping.to_v.",
    "slot_attention.gru.": "grouping.gru.",
    "slot_attention.mlp.0.": "grouping.norm_mlp.",
    "slot_attention.mlp.1.": "grouping.update_mlp.0.",
    "slot_attention.mlp.3.": "grouping.update_mlp.2.",
}
RESNET = {  # LDM ResBlock -> diffusers ResnetBlock2D
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


@dataclass(frozen=True)
class SlotDiffusionImporterParams:
    preset: Literal["auto", "slotdiffusion-coco", "slotdiffusion-voc"] = param(
        "auto", "the run's base preset; auto: slotdiffusion-voc if the file name says voc"
    )
    protocol: bool = param(
        True,
        "name SlotDiffusion's evaluation protocol (protocol='slotdiffusion': test_seg.py, masks "
        "at the input size) unless an override names one; false = protocol='' (none)",
    )


@dataclass(frozen=True)
class SlotDiffusionLayout:
    num_slots: int
    slot_dim: int
    token_dim: int
    encoder_out: int
    mlp_hidden: int
    token_grid: list[int]
    unet_widths: list[int]
    unet_attention: list[bool]
    unet_layers: int
    context_dim: int
    latent_channels: int
    vq_channels: int
    vq_channel_mult: list[int]
    vq_layers: int
    vq_codebook_size: int
    train_timesteps: int
    beta_start: float
    beta_end: float
    has_encoder: bool
    has_ema: bool


def _need(state: dict[str, Tensor], key: str, axis: int = 0) -> int:
    size = dim_of(state, key, axis)
    if size is None:
        raise DataError(f"not {WHAT}: it has no {key}")
    return size


def inspect(state: dict[str, Tensor]) -> SlotDiffusionLayout:
    """The sizes the tensors record (a one-line DataError if a part is missing)."""
    k = _need(state, "init_latents", 1)
    d = _need(state, "init_latents", 2)
    grid = state.get("encoder_pos_embedding.grid")
    blocks = indices_under(state, UNET + "input_blocks.")
    downs = [i for i in blocks if f"{UNET}input_blocks.{i}.0.op.weight" in state]
    levels = len(downs) + 1
    if not blocks or (len(blocks) - 1 - len(downs)) % levels:
        raise DataError(f"not {WHAT}: no LDM UNet under {UNET}")
    layers = (len(blocks) - 1 - len(downs)) // levels
    first = [1 + level * (layers + 1) for level in range(levels)]
    widths = [_need(state, f"{UNET}input_blocks.{i}.0.out_layers.3.weight") for i in first]
    attention = [f"{UNET}input_blocks.{i}.1.proj_in.weight" in state for i in first]
    context = next(
        (v.shape[1] for key, v in state.items() if key.startswith(UNET) and "attn2.to_k" in key),
        None,
    )
    if context is None:
        raise DataError(f"not {WHAT}: its UNet has no cross-attention (attn2.to_k)")
    vq_levels = indices_under(state, VQVAE + "encoder.down.")
    ch = _need(state, VQVAE + "encoder.conv_in.weight")
    mult = [_need(state, f"{VQVAE}encoder.down.{i}.block.0.conv2.weight") // ch for i in vq_levels]
    betas = state.get("dm_decoder.betas")
    if betas is None or betas.dim() != 1 or len(betas) < 2:
        raise DataError(f"not {WHAT}: it has no dm_decoder.betas schedule")
    return SlotDiffusionLayout(
        num_slots=k,
        slot_dim=d,
        token_dim=_need(state, "encoder_out_layer.0.weight"),
        encoder_out=_need(state, "encoder_out_layer.3.weight"),
        mlp_hidden=_need(state, "slot_attention.mlp.1.weight"),
        token_grid=list(grid.shape[1:3]) if grid is not None and grid.dim() == 4 else [],
        unet_widths=widths,
        unet_attention=attention,
        unet_layers=layers,
        context_dim=int(context),
        latent_channels=_need(state, VQVAE + "quant_conv.weight"),
        vq_channels=ch,
        vq_channel_mult=mult,
        vq_layers=len(indices_under(state, VQVAE + "encoder.down.0.block.")),
        vq_codebook_size=_need(state, VQVAE + "quantize.embedding.weight"),
        train_timesteps=len(betas),
        beta_start=round(float(betas[0]), 8),
        beta_end=round(float(betas[-1]), 8),
        has_encoder=any(key.startswith("encoder.dino.") for key in state),
        has_ema=any(key.startswith(EMA) for key in state),
    )


def ldm_unet_prefixes(levels: int, layers: int, attention: list[bool]) -> dict[str, str]:
    """LDM/OpenAI UNetModel module prefixes -> diffusers UNet2DConditionModel prefixes.

    LDM numbers its blocks in one flat list each way: input_blocks[0] is conv_in, then per
    level `layers` (ResBlock[, SpatialTransformer]) blocks and, but at the last level, a
    Downsample block; output_blocks hold `layers + 1` blocks per level, deepest first, the
    last of each (but at the top level) ending in an Upsample."""
    table = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "middle_block.0.": "mid_block.resnets.0.",
        "middle_block.1.": "mid_block.attentions.0.",
        "middle_block.2.": "mid_block.resnets.1.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
    }
    for level in range(levels):
        for j in range(layers):
            i = 1 + level * (layers + 1) + j
            table[f"input_blocks.{i}.0."] = f"down_blocks.{level}.resnets.{j}."
            table[f"input_blocks.{i}.1."] = f"down_blocks.{level}.attentions.{j}."
        if level < levels - 1:
            i = 1 + level * (layers + 1) + layers
            table[f"input_blocks.{i}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."
    for up in range(levels):
        level = levels - 1 - up
        for j in range(layers + 1):
            i = up * (layers + 1) + j
            table[f"output_blocks.{i}.0."] = f"up_blocks.{up}.resnets.{j}."
            if attention[level]:
                table[f"output_blocks.{i}.1."] = f"up_blocks.{up}.attentions.{j}."
            if level > 0 and j == layers:
                at = 2 if attention[level] else 1
                table[f"output_blocks.{i}.{at}.conv."] = f"up_blocks.{up}.upsamplers.0.conv."
    return table


def ldm_unet_to_diffusers(
    state: dict[str, Tensor], levels: int, layers: int, attention: list[bool]
) -> dict[str, Tensor]:
    """An LDM UNet state_dict (keys without prefix) under diffusers' keys. The
    SpatialTransformer internals (norm, proj_in, transformer_blocks, proj_out) are named
    alike in both; ResBlocks are renamed (`RESNET`)."""
    table = ldm_unet_prefixes(levels, layers, attention)
    ordered = sorted(table, key=len, reverse=True)  # 'input_blocks.1.0.' before '.1.'
    out = {}
    for key, value in state.items():
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            raise DataError(f"unexpected UNet key {UNET}{key} in {WHAT}")
        rest = key[len(prefix) :]
        if ".resnets." in table[prefix]:
            inner = next((r for r in RESNET if rest.startswith(r)), None)
            if inner is None:
                raise DataError(f"unexpected UNet key {UNET}{key} in {WHAT}")
            rest = RESNET[inner] + rest[len(inner) :]
        out[table[prefix] + rest] = value
    return out


def linspace_grid(h: int, w: int) -> Tensor:
    """SoftPositionEmbed's grid [1, h, w, 4]: (row, col, 1 - row, 1 - col) on linspace(0, 1)."""
    r, c = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    grid = torch.stack([r, c], -1)
    return torch.cat([grid, 1 - grid], -1)[None]


def map_state(
    state: dict[str, Tensor], layout: SlotDiffusionLayout
) -> tuple[dict[str, Tensor], list[str]]:
    """(the official tensors under ocl-bench's model keys, notes on what was dropped)."""
    out: dict[str, Tensor] = {}
    unet: dict[str, Tensor] = {}
    vqvae: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key.startswith(("encoder.dino.", EMA)) or key == "encoder_pos_embedding.grid":
            continue
        if key.startswith("dm_decoder.") and key.split(".", 1)[1] in SCHEDULE_BUFFERS:
            continue
        if key == "dm_decoder.logvar":
            continue
        if key == "init_latents":
            out["grouping.queries"] = value.reshape(layout.num_slots, layout.slot_dim)
        elif key.startswith(UNET):
            unet[key[len(UNET) :]] = value
        elif key.startswith(VQVAE):
            vqvae[key[len(VQVAE) :]] = value
        elif prefix := next((p for p in SLOT_ATTENTION if key.startswith(p)), None):
            out[SLOT_ATTENTION[prefix] + key[len(prefix) :]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise DataError(
            f"not {WHAT}: unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
        )
    levels = len(layout.unet_widths)
    converted = ldm_unet_to_diffusers(unet, levels, layout.unet_layers, layout.unet_attention)
    out.update({f"decoder.unet.{k}": v for k, v in converted.items()})
    vq = official_to_diffusers(vqvae, len(layout.vq_channel_mult))
    out.update({f"decoder.vqvae.model.{k}": v for k, v in vq.items()})
    notes = []
    if layout.has_encoder:
        notes.append(
            "encoder.dino.* (the frozen DINO ViT-S/8) dropped: the encoder plugin loads "
            "the same public weights"
        )
    if layout.has_ema:
        notes.append("dm_decoder.model_ema.* dropped: the UNet is the trained (non-EMA) one")
    notes.append("decoder.null_slots (guidance only, unused at guidance 1) keeps its init")
    return out, notes


def check_grid(state: dict[str, Tensor]) -> None:
    """The position embedding's grid buffer must be the linspace grid position='linspace'
    rebuilds (a different grid would need another position mode)."""
    grid = state.get("encoder_pos_embedding.grid")
    if grid is None:
        raise DataError(f"not {WHAT}: it has no encoder_pos_embedding.grid")
    h, w = grid.shape[1:3]
    if grid.shape != (1, h, w, 4) or not torch.allclose(grid.float(), linspace_grid(h, w)):
        raise DataError(
            "encoder_pos_embedding.grid is not SoftPositionEmbed's linspace(0, 1) grid; "
            "position='linspace' would not reproduce it"
        )


def preset_for(path: Path, choice: str) -> str:
    if choice != "auto":
        return choice
    return "slotdiffusion-voc" if re.search(r"voc", path.name, re.I) else "slotdiffusion-coco"


class SlotDiffusionImporter(CheckpointImporter):
    """Released SlotDiffusion image models: slot_attention + the slotdiffusion decoder."""

    name = "slotdiffusion"
    Params = SlotDiffusionImporterParams
    # Its default params.
    conformance = {}

    def convert(self, path: Path, overrides: list[str]) -> ImportResult:
        state = read_state_dict(path, WHAT)
        layout = inspect(state)
        check_grid(state)
        raw = load_raw(preset_for(path, self.params.preset))
        name_protocol(raw, "slotdiffusion" if self.params.protocol else "", overrides)
        implied: dict[str, Any] = {
            "encoder.normalize": "half",
            "grouping.num_slots": layout.num_slots,
            "grouping.slot_dim": layout.slot_dim,
            "grouping.mlp_hidden": layout.mlp_hidden,
            "grouping.init": "learned_queries",
            "grouping.pre_mlp": True,
            "grouping.pre_mlp_out": layout.encoder_out,
            "grouping.pre_mlp_hidden": layout.encoder_out,
            "grouping.position": "linspace",
            "decoder.stage": "diffusion",
            "decoder.vqvae": "imported",
            "decoder.tiny": False,
            "decoder.unet_widths": layout.unet_widths,
            "decoder.unet_attention": layout.unet_attention,
            "decoder.unet_layers": layout.unet_layers,
            "decoder.vq_channels": layout.vq_channels,
            "decoder.vq_channel_mult": layout.vq_channel_mult,
            "decoder.vq_layers": layout.vq_layers,
            "decoder.vq_latent_channels": layout.latent_channels,
            "decoder.vq_codebook_size": layout.vq_codebook_size,
            "decoder.train_timesteps": layout.train_timesteps,
            "decoder.beta_start": layout.beta_start,
            "decoder.beta_end": layout.beta_end,
        }
        set_unless_overridden(raw, implied, overrides)
        raw = apply_overrides(raw, overrides)
        cfg = resolve(raw)
        if layout.context_dim != cfg.grouping.params.slot_dim:
            raise DataError(
                f"{path}: the UNet's context is {layout.context_dim}-d, the slots "
                f"{cfg.grouping.params.slot_dim}-d"
            )
        image_size = make_dataset(cfg.dataset, cfg.eval.split).image_size
        model = build_model(cfg, image_size)
        mapped, notes = map_state(state, layout)
        self._check_schedule(model, state, path)
        current = model.state_dict()
        owned = [k for k in current if k.startswith("grouping.")]
        owned += [k for k in current if k.startswith(("decoder.unet.", "decoder.vqvae."))]
        report = check_keys(mapped, {k: tuple(current[k].shape) for k in owned})
        if not report.ok:
            raise DataError(f"{path} does not fit the run's model: {report.text()}")
        load_strict(model, {**current, **mapped}, f"the SlotDiffusion checkpoint {path}")
        notes.append(protocol_note(cfg, raw.get("protocol", "")))
        summary = (
            f"SlotDiffusion: {layout.num_slots} slots x {layout.slot_dim}, UNet "
            f"{layout.unet_widths} x {layout.unet_layers}, VQ-VAE {layout.vq_channels} x "
            f"{layout.vq_channel_mult} with {layout.vq_codebook_size} codes, T = "
            f"{layout.train_timesteps}"
        )
        return ImportResult(config=cfg, model=model, summary=summary, layout=layout, notes=notes)

    @staticmethod
    def _check_schedule(model: Any, state: dict[str, Tensor], path: Path) -> None:
        """The file's alphas_bar must be the decoder's (DDPM 'linear' = scaled_linear)."""
        ours = model.decoder.scheduler.alphas_cumprod.float()
        theirs = state.get("dm_decoder.alphas_bar")
        if theirs is not None and (
            theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours, atol=1e-5)
        ):
            raise DataError(
                f"{path}: dm_decoder.alphas_bar is not the decoder's scaled_linear schedule "
                f"from betas {float(state['dm_decoder.betas'][0])}.."
                f"{float(state['dm_decoder.betas'][-1])}"
            )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SlotDiffusionImporter]


__all__ = [
    "SlotDiffusionImporter",
    "SlotDiffusionImporterParams",
    "SlotDiffusionLayout",
    "inspect",
    "ldm_unet_prefixes",
    "ldm_unet_to_diffusers",
    "map_state",
]
