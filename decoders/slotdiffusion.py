"""SlotDiffusion's decoder: a slot-conditioned UNet latent diffusion model over its own VQ-VAE.

Wu et al., "SlotDiffusion: Object-Centric Generative Modeling with Diffusion Models"
(NeurIPS 2023); official code github.com/Wuziyi616/SlotDiffusion (facts in
../shared/reference/diffusion-and-glass.md, section 2; "SDF file:line" below). Two stages,
as the official recipe trains them:

1. `stage = "vqvae"`: only the VQ-VAE (image_tokenizers/slotdiffusion_vqvae.py) trains,
   on its own losses (returned in `extras` for the `tokenizer_loss` objective); the
   output is its reconstruction (kind "sample"). Preset `slotdiffusion-vqvae-coco`.
2. `stage = "diffusion"`: the VQ-VAE is loaded from `vqvae` (the stage-1 run directory,
   "@slotdiffusion-vqvae-coco" in a grid, or a checkpoint file) and frozen; a diffusers
   `UNet2DConditionModel` denoises its **pre-quantisation** latents (divided by
   `z_scale_factor`, SDF ldm.py:40) with the slots as the cross-attention context directly
   (no projection, context_dim = slot size, SDF ddpm.py:330-357); DDPM with T = 1000 and
   the LDM "linear" schedule 0.0015 -> 0.0195 (= diffusers `scaled_linear`), epsilon
   prediction, MSE (the `denoising` objective). `forward` takes the step's latents, noise
   and timesteps instead of drawing them (its docstring gives the draw order: noise, then
   t; the official loss draws t, then noise).

UNet sizes (SDF sa_ldm_dino_coco_params-res224.py `unet_dict`): model_channels 128,
channel_mult (1, 2, 3, 4) -> widths (128, 256, 384, 512), 2 res-blocks per level,
attention at downsampling factors (8, 4, 2) -> every level but the first (and the middle
block), 32-channel heads (diffusers' `attention_head_dim` is the head *count* per level:
widths / 32), transformer depth 1, dropout 0.1, conv in/out projections of the
transformers (use_linear_in_transformer false).

Sampling (`generate`): diffusers DPM-Solver++ multistep (the official sampler is DPM-Solver++
*singlestep*, order 3, max(20, T // 50) = 20 steps, SDF cond_ddpm.py:141-174) with, as the
official `vq_denoised`, the predicted x0 re-quantised to the codebook at every step
(`quantize_x0`), then the latents quantised and decoded. Classifier-free guidance uses an
explicit learned null-slot embedding (`null_dropout` > 0 trains it); the official code has
no guidance (scale 1.0, the default here).

`cache_latents` stores the frozen VQ-VAE's latents in the feature cache
(bench/run/feature_cache.py), keyed by its weights' hash and each image tensor's sha1, so
flipped images are their own entries and a retrained VQ-VAE never reads stale latents.

Masks for object discovery are the grouping's last-iteration slot attention (softmax over
slots), as SlotDiffusion evaluates (SDF sa_diffusion.py:49-51): this decoder has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Denoising, Dims, Features, Slots
from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder
from ocl_bench.api.runtime import autocast_dtype
from ocl_bench.api.weights import read_state_dict, state_sha256
from ocl_bench.decoders.diffusion import (
    drop_conditions,
    noisy_latents,
    prediction_type,
    sample_latents,
    training_target,
)
from ocl_bench.decoders.latent_diffusion import diffusion_inputs
from ocl_bench.run import checkpoint
from ocl_bench.run.feature_cache import FeatureCache, sample_ids
from ocl_bench.run.registry import build_tokenizer

TOKENIZER_LOSS = "tokenizer_loss."  # extras keys the tokenizer_loss objective adds
VQVAE_PREFIX = "decoder.vqvae."  # where a stage-1 run's model file holds the VQ-VAE
# Bumped whenever what the cached latents are computed from changes.
LATENT_PREPROCESS = "unit-to-pm1|vqvae-encoder+quant_conv|v1"

# Tiny stand-ins for CPU tests (DESIGN: the reference's CPU-verified diffusers sizes).
TINY_VQVAE = {
    "channels": 16,
    "channel_mult": [1, 2],
    "layers_per_block": 1,
    "codebook_size": 64,
    "norm_groups": 8,
}
TINY_UNET = {"widths": [32, 64], "attention": [False, True], "layers": 1, "norm_groups": 8}


@dataclass(frozen=True)
class SlotDiffusionParams:
    stage: Literal["diffusion", "vqvae"] = param(
        "diffusion",
        "'vqvae' trains only the VQ-VAE (first stage); 'diffusion' trains the UNet on a "
        "frozen trained VQ-VAE (second stage)",
    )
    vqvae: str = param(
        "",
        "trained VQ-VAE for stage 'diffusion': a stage-1 run directory ('@slotdiffusion-"
        "vqvae-coco' in a grid), a checkpoint file, 'imported' (the run's checkpoint holds "
        "it: ocl-bench import slotdiffusion) or 'random' (tests only)",
    )
    tiny: bool = param(False, "tiny VQ-VAE and UNet (CPU tests); ignores the size params")
    vq_channels: int = param(64, "VQ-VAE base width (official ch 64)", ge=1)
    vq_channel_mult: list[int] = param([1, 2, 4], "VQ-VAE width multipliers (4x downsampling)")
    vq_layers: int = param(2, "VQ-VAE residual blocks per level", ge=1)
    vq_latent_channels: int = param(3, "latent / codebook channels (official 3)", ge=1)
    vq_codebook_size: int = param(4096, "VQ-VAE codebook entries (official 4096)", ge=2)
    vq_norm_groups: int = param(32, "VQ-VAE GroupNorm groups", ge=1)
    vq_recon_loss: Literal["l1", "mse"] = param("l1", "VQ-VAE reconstruction loss (official L1)")
    unet_widths: list[int] = param(
        [128, 256, 384, 512], "UNet widths per level (official 128 x (1, 2, 3, 4))"
    )
    unet_attention: list[bool] = param(
        [False, True, True, True],
        "cross-attention per level (official: at downsampling factors 2, 4, 8)",
    )
    unet_layers: int = param(2, "UNet res-blocks per level (official 2)", ge=1)
    head_channels: int = param(32, "channels per attention head (official 32)", ge=1)
    unet_norm_groups: int = param(32, "UNet GroupNorm groups", ge=1)
    dropout: float = param(0.1, "UNet dropout (official 0.1)", ge=0, lt=1)
    gradient_checkpointing: bool = param(False, "UNet gradient checkpointing (saves memory)")
    cache_latents: bool = param(
        False,
        "cache the frozen VQ-VAE's latents on disk ($OCL_BENCH_CACHE), keyed by its weights "
        "and each image tensor's hash (exact, also under random flips)",
    )
    train_timesteps: int = param(1000, "diffusion steps T (official 1000)", ge=2)
    beta_start: float = param(0.0015, "first beta (LDM 'linear' = sqrt-linear)", gt=0, lt=1)
    beta_end: float = param(0.0195, "last beta", gt=0, lt=1)
    z_scale_factor: float = param(1.0, "latents are divided by this (official 1.0)", gt=0)
    null_dropout: float = param(
        0.0,
        "probability a training sample's slots are replaced by the learned null slots "
        "(classifier-free guidance training; official: 0, no guidance)",
        ge=0,
        le=1,
    )
    sample_steps: int = param(20, "DPM-Solver steps in generate (official 20)", ge=1)
    solver_order: int = param(3, "DPM-Solver order (official 3)", ge=1, le=3)
    guidance_scale: float = param(1.0, "classifier-free guidance scale (1 = none, official)", ge=0)
    quantize_x0: bool = param(
        True, "re-quantise the predicted x0 at every sampling step (official vq_denoised)"
    )
    decoder_lr_scale: float = param(
        2.0, "lr of UNet and null slots = train.lr x this (official dec_lr 2e-4 vs lr 1e-4)", gt=0
    )


class SlotDiffusionDecoder(nn.Module, Decoder):
    """SlotDiffusion: slots condition a UNet that denoises its own VQ-VAE's latents."""

    kind = "decoder"
    name = "slotdiffusion"
    Params = SlotDiffusionParams
    # Tiny UNet over a random tiny VQ-VAE (stage 2); slots dropped with p = 0.5, so the
    # null slots train too.
    conformance = {
        "decoder.tiny": True,
        "decoder.vqvae": "random",
        "decoder.sample_steps": 2,
        "decoder.null_dropout": 0.5,
        "objectives": {"denoising": {}},
    }
    output = Denoising
    requires = frozenset({"slots.slots"})
    provides = frozenset({"generation.images"})

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        needs, gives = super().capabilities(params)
        if params.stage == "vqvae":
            gives = (gives - {"generation.images"}) | {"decoding.tokenizer_losses"}
        return needs, gives

    def __init__(self, params: SlotDiffusionParams, dims: Dims):
        super().__init__()
        if dims.slot_dim is None or dims.num_slots is None:
            raise ValueError("the slotdiffusion decoder needs the slot dimension and count")
        self.params = params
        p = params
        vq = (
            TINY_VQVAE
            if p.tiny
            else {
                "channels": p.vq_channels,
                "channel_mult": list(p.vq_channel_mult),
                "layers_per_block": p.vq_layers,
                "codebook_size": p.vq_codebook_size,
                "norm_groups": p.vq_norm_groups,
            }
        )
        vq = {**vq, "latent_channels": p.vq_latent_channels, "recon_loss": p.vq_recon_loss}
        self.vqvae = build_tokenizer("slotdiffusion_vqvae", vq, "decoder")
        self.latent_grid = self.vqvae.grid(tuple(dims.image_size))
        self.latent_channels = p.vq_latent_channels
        self.unet: UNet2DConditionModel | None = None
        self.cache = FeatureCache() if p.cache_latents and p.stage == "diffusion" else None
        self._vqvae_hash: str | None = None
        if p.stage == "vqvae":
            return
        self._load_vqvae(p.vqvae)
        self.vqvae.requires_grad_(False)
        self.vqvae.eval()
        unet = (
            TINY_UNET
            if p.tiny
            else {
                "widths": list(p.unet_widths),
                "attention": list(p.unet_attention),
                "layers": p.unet_layers,
                "norm_groups": p.unet_norm_groups,
            }
        )
        self.unet = build_unet(
            unet["widths"],
            unet["attention"],
            unet["layers"],
            unet["norm_groups"],
            p.head_channels if not p.tiny else 8,
            channels=self.latent_channels,
            context_dim=dims.slot_dim,
            dropout=p.dropout,
            sample_size=self.latent_grid[0],
        )
        if p.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=p.train_timesteps,
            beta_start=p.beta_start,
            beta_end=p.beta_end,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            clip_sample=False,
        )
        # One learned null slot per slot index: the unconditional context of CFG.
        self.null_slots = nn.Parameter(torch.randn(dims.num_slots, dims.slot_dim) * 0.02)

    def _load_vqvae(self, source: str) -> None:
        if source in ("random", "imported"):
            # random: the official code's silent fallback, made explicit (tests, stand-ins);
            # imported: the run's own checkpoint holds the VQ-VAE (ocl-bench import
            # slotdiffusion), loaded over this init with the rest of the model
            return
        if not source:
            raise ConfigError(
                "decoder.vqvae: SlotDiffusion's diffusion stage needs its trained VQ-VAE: give "
                "the stage-1 run directory (ocl-bench train slotdiffusion-vqvae-coco), a "
                "checkpoint file, or 'random'"
            )
        if source.startswith("@"):
            raise ConfigError(
                f"decoder.vqvae = '{source}' names the run of preset '{source[1:]}', which only "
                "`ocl-bench grid` trains; give its run directory (ocl-bench train "
                f"{source[1:]} --out DIR, then decoder.vqvae=DIR)"
            )
        path = Path(source).expanduser()
        if path.is_dir():
            found = checkpoint.recover(path / "checkpoint")
            if found is None:
                raise DataError(f"decoder.vqvae: no checkpoint in {path / 'checkpoint'}")
            model_file = found / checkpoint.MODEL_FILE
            state = read_state_dict(model_file)
            n = len(VQVAE_PREFIX)
            own = {k[n:]: v for k, v in state.items() if k.startswith(VQVAE_PREFIX)}
            if not own:
                raise DataError(
                    f"decoder.vqvae: {model_file} holds no SlotDiffusion VQ-VAE "
                    f"({VQVAE_PREFIX}* keys); give a run of decoder.stage='vqvae'"
                )
            self.vqvae.load_state(own, str(model_file))
        elif path.is_file():
            self.vqvae.load_file(path)
        else:
            raise DataError(
                f"decoder.vqvae: {path} not found (a stage-1 run directory or a VQ-VAE "
                "checkpoint file)"
            )

    def train(self, mode: bool = True) -> SlotDiffusionDecoder:
        super().train(mode)
        if self.unet is not None:
            self.vqvae.eval()  # frozen in the second stage
        return self

    def output_dims(self, dims: Dims) -> Dims:
        dims.latent_channels = self.latent_channels
        dims.latent_grid = self.latent_grid
        return dims

    def param_groups(self) -> list[dict[str, Any]]:
        if self.unet is None:
            return []
        params = [*self.unet.parameters(), self.null_slots]
        return [{"params": params, "lr_scale": self.params.decoder_lr_scale, "name": "unet"}]

    @torch.no_grad()
    def latents(self, images: Tensor) -> Tensor:
        """What the UNet denoises: the VQ-VAE's pre-quantisation latents / z_scale_factor."""
        return self._vqvae_latents(images) / self.params.z_scale_factor

    def _vqvae_latents(self, images: Tensor) -> Tensor:
        if self.cache is None:
            return self.vqvae.latents(images)
        ids = sample_ids(images)
        if self._vqvae_hash is None:  # frozen: its weights never change during a run
            self._vqvae_hash = state_sha256(self.vqvae)
        key = self.cache.key(
            encoder="slotdiffusion.vqvae",
            weights=self._vqvae_hash,
            image_size=list(images.shape[-2:]),
            preprocess=LATENT_PREPROCESS,
            torch=torch.__version__,
            device=images.device.type,
            autocast=autocast_dtype(images.device),  # fp16/bf16 latents differ from fp32
        )
        found = self.cache.lookup(key, ids)
        missing = [i for i, sid in enumerate(ids) if sid not in found]
        if missing:
            computed = self.vqvae.latents(images[torch.tensor(missing, device=images.device)])
            self.cache.put(key, [ids[i] for i in missing], computed)
            found.update({ids[i]: computed[j] for j, i in enumerate(missing)})
        return torch.stack([found[sid].to(images.device, images.dtype) for sid in ids])

    def denoise(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """The UNet's epsilon prediction for noisy latents conditioned on `context` [B,K,C]."""
        assert self.unet is not None
        out = self.unet(noisy, timesteps, encoder_hidden_states=context.to(noisy.dtype))
        return out.sample

    def forward(
        self,
        slots: Slots,
        features: Features,
        batch: Batch,
        *,
        latents: Tensor | None = None,
        noise: Tensor | None = None,
        timesteps: Tensor | None = None,
    ) -> Denoising:
        """Stage 2: one denoising training step's epsilon prediction and target (stage 1:
        the VQ-VAE's reconstruction and losses; the keywords are then refused).

        The step's random inputs can be given instead of drawn: `latents` [B, C, h, w], what
        the UNet denoises (the VQ-VAE's pre-quantisation latents / z_scale_factor; the
        VQ-VAE is then not run), `noise` of the same shape, `timesteps` long [B] in [0, T).
        Each one not given is drawn from the global RNG in this order: `noise` =
        randn_like(latents), then `timesteps` = randint(0, T, (B,)), then the null-slot
        dropout (training with null_dropout > 0 only). SlotDiffusion's LDM.loss_function
        draws t first, then the noise: pass them to reproduce its step.
        """
        images = batch.images
        if self.unet is None:  # stage 1: the VQ-VAE alone
            if latents is not None or noise is not None or timesteps is not None:
                raise ConfigError("decoder.stage='vqvae' has no diffusion step to give inputs")
            recon, losses = self.vqvae.autoencode(images)
            zeros = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            extras = {f"{TOKENIZER_LOSS}{k}": v for k, v in losses.items()}
            return Denoising(
                prediction=recon, target=images, timesteps=zeros, kind="sample", extras=extras
            )
        if latents is None:
            latents = self.latents(images)
        noise, t = diffusion_inputs(self.scheduler, latents, noise, timesteps)
        noisy = noisy_latents(self.scheduler, latents, noise, t)
        context = slots.slots
        if self.training and self.params.null_dropout > 0:
            context = drop_conditions(context, self.null_slots, self.params.null_dropout)
        prediction = self.denoise(noisy, t, context)
        target = training_target(self.scheduler, latents, noise, t)
        return Denoising(
            prediction=prediction,
            target=target,
            timesteps=t,
            kind=prediction_type(self.scheduler),
        )

    def _quantized_x0(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """Epsilon re-derived from the codebook-quantised x0 estimate (official vq_denoised):
        DPM-Solver++ works with x0, so quantising x0 = (x_t - s_t eps) / a_t and mapping it
        back through the same step is what quantising the solver's data prediction means."""
        eps = self.denoise(noisy, timesteps, context)
        abar = self.scheduler.alphas_cumprod.to(noisy.device)[timesteps.long()]
        a = abar.sqrt().view(-1, 1, 1, 1).to(noisy.dtype)
        s = (1 - abar).sqrt().view(-1, 1, 1, 1).to(noisy.dtype)
        x0 = (noisy - s * eps) / a
        scale = self.params.z_scale_factor
        x0 = self.vqvae.quantize(x0 * scale) / scale
        return (noisy - a * x0) / s

    @torch.no_grad()
    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images [B,3,H,W] in [0, 1] sampled from slots with DPM-Solver++ (seeded)."""
        if self.unet is None:
            raise ConfigError("decoder.stage='vqvae' trains the VQ-VAE only; it cannot generate")
        p = self.params
        context = slots.slots
        b = context.shape[0]
        shape = (b, self.latent_channels, *self.latent_grid)
        denoise = self._quantized_x0 if p.quantize_x0 else self.denoise
        latents = sample_latents(
            denoise,
            self.scheduler,
            context,
            self.null_slots,
            shape,
            steps or p.sample_steps,
            p.guidance_scale if guidance_scale is None else guidance_scale,
            generator,
            solver_options={"solver_order": p.solver_order, "algorithm_type": "dpmsolver++"},
        )
        return self.vqvae.decode_latents(latents * p.z_scale_factor)


def build_unet(
    widths: list[int],
    attention: list[bool],
    layers: int,
    norm_groups: int,
    head_channels: int,
    *,
    channels: int,
    context_dim: int,
    dropout: float,
    sample_size: int,
) -> UNet2DConditionModel:
    """A diffusers UNet laid out like the LDM/OpenAI UNetModel SlotDiffusion uses: per
    level a down block (with cross-attention where `attention` says), the mirrored up
    block, a cross-attention middle block, heads of `head_channels` channels."""
    if len(widths) != len(attention):
        raise ValueError(
            f"unet_widths ({len(widths)} levels) and unet_attention ({len(attention)}) differ"
        )
    if any(w % norm_groups or w % head_channels for w in widths):
        raise ValueError(f"UNet widths {widths} must divide by norm groups and head channels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        norm_num_groups=norm_groups,
        cross_attention_dim=context_dim,
        attention_head_dim=tuple(w // head_channels for w in widths),
        dropout=dropout,
    )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SlotDiffusionDecoder]


__all__ = ["SlotDiffusionDecoder", "SlotDiffusionParams", "build_unet"]
