"""StableLSD's decoder: slots condition a (frozen) Stable Diffusion UNet in VAE latent space.

Jiang et al., "Object-Centric Slot Diffusion" (NeurIPS 2023), Stable-LSD variant; the
official code is github.com/JindongJiang/latent-slot-diffusion (train_lsd.py). Facts used
here are listed in ../shared/reference/diffusion-and-glass.md, section 1:

- the slots go through LayerNorm + Linear(slot_dim -> the UNet's cross_attention_dim)
  (the official `out_layer_norm` / `out_linear` of MultiHeadSTEVESA) and are passed as
  `encoder_hidden_states`, in place of CLIP text embeddings;
- images in [-1, 1] -> frozen AutoencoderKL -> `latent_dist.sample()` x `scaling_factor`;
- DDPM training: uniform timesteps in [0, 1000), noise added by the scheduler, target by
  its `prediction_type` (SD 2.1: v_prediction), MSE (objectives/denoising.py); the step's
  latents, noise and timesteps can be passed to `forward` instead of drawn (its docstring
  gives the draw order);
- the UNet is frozen (StableLSD; `train_unet=true` fine-tunes it), only slot attention and
  the slot projection train;
- the decoder has no masks: object discovery scores the grouping's last-iteration slot
  attention (tasks.object_discovery.masks = ["attn"]).

Generation replaces StableLSD's implicit unconditional branch (diffusers pads CLIP("") to
K tokens when guidance > 1) by an explicit null condition [K, C]: CLIP("") itself when the
Stable Diffusion folder has its text encoder, else a learned embedding trained by dropping
whole slot sets with probability `cond_drop_prob`. Sampling is DPM-Solver multistep
(decoders/diffusion.py).

Stable Diffusion comes from a local diffusers folder only: `decoder.pretrained`, then
$OCL_BENCH_SD, then the Hugging Face cache of `model_id` (read offline). `tiny=true` builds
random stand-ins of the same classes, small enough for a CPU (tests, tiny grids).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, Denoising, Dims, Features, Slots
from ocl_bench.api.diffusion import tiny_unet_and_vae
from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Decoder
from ocl_bench.api.runtime import autocast_dtype
from ocl_bench.api.weights import hf_hub_cache_dir, state_sha256
from ocl_bench.decoders import diffusion
from ocl_bench.run.feature_cache import FeatureCache, sample_ids

SD_ENV = "OCL_BENCH_SD"
SD_MODEL_ID = "stabilityai/stable-diffusion-2-1"
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json, the noise schedule LSD
# trains with (DDPMScheduler.from_pretrained(..., subfolder="scheduler")); the tiny
# stand-in uses it too, so tiny runs train with SD 2.1's schedule and prediction type.
SD21_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "steps_offset": 1,
}  # (its DDIM-only key set_alpha_to_one=false does not apply to DDPM training)
# Bumped whenever what the latents are computed from changes (invalidates cached latents).
LATENT_PREPROCESS = "resize-bilinear-antialias|x2-1|latent_dist-mean-logvar|v1"


@dataclass(frozen=True)
class LatentDiffusionParams:
    pretrained: str = param(
        "",
        "local diffusers folder of Stable Diffusion (unet/, vae/, scheduler/); empty: "
        f"${SD_ENV}, then the Hugging Face cache of model_id (offline)",
    )
    model_id: str = param(SD_MODEL_ID, "Hugging Face repo looked up in the local cache only")
    tiny: bool = param(False, "random tiny UNet/VAE with SD 2.1's scheduler (tests, CPU runs)")
    tiny_width: int = param(32, "tiny UNet: block widths (w, 2w), cross-attention width w", ge=8)
    image_size: int = param(
        0, "side of the images the VAE sees and generation returns (0 = the dataset's)", ge=0
    )
    prediction_type: Literal["scheduler", "epsilon", "v_prediction"] = param(
        "scheduler", "what the UNet predicts: as the scheduler config says, or overridden"
    )
    train_unet: bool = param(False, "fine-tune the UNet (StableLSD keeps it frozen)")
    slot_norm: bool = param(True, "LayerNorm before the slot projection (LSD out_layer_norm)")
    null_condition: Literal["auto", "learned", "empty_caption"] = param(
        "auto",
        "classifier-free guidance's null condition: CLIP('') padded to K tokens (needs "
        "text_encoder/ and tokenizer/ in the folder), a learned [K, C] embedding, or "
        "'auto' (the caption when the folder has a text encoder, else learned)",
    )
    cond_drop_prob: float = param(
        0.0, "training: probability a sample's slots are replaced by the null condition", ge=0, le=1
    )
    steps: int = param(25, "DPM-Solver steps of generate() (LSD validation: 25)", ge=1)
    guidance_scale: float = param(
        1.0, "classifier-free guidance of generate() (LSD validation: 1.0)", ge=0
    )
    gradient_checkpointing: bool = param(False, "recompute UNet activations in backward")
    cache_latents: bool = param(
        False,
        "cache the frozen VAE's latent distributions on disk ($OCL_BENCH_CACHE), keyed by "
        "VAE weights and a hash of each image; a fresh latent is still sampled every step",
    )


def find_stable_diffusion(p: LatentDiffusionParams) -> Path:
    """The local diffusers folder to load, or a one-line DataError naming every place."""
    for where, value in (
        ("decoder.pretrained", p.pretrained),
        (f"${SD_ENV}", os.environ.get(SD_ENV)),
    ):
        if value:
            path = Path(value).expanduser()
            if not (path / "unet").is_dir():
                raise DataError(
                    f"{where}={path} is not a diffusers Stable Diffusion folder "
                    "(it needs unet/, vae/ and scheduler/)"
                )
            return path
    cached = _hf_snapshot(p.model_id)
    if cached is not None:
        return cached
    raise DataError(
        f"decoder '{LatentDiffusionDecoder.name}': no Stable Diffusion found; set "
        f"decoder.pretrained=PATH (a diffusers folder with unet/, vae/, scheduler/), or "
        f"${SD_ENV}=PATH, or put {p.model_id} in the Hugging Face cache ({hf_hub_cache_dir()};"
        f" `huggingface-cli download {p.model_id}` once online); decoder.tiny=true runs "
        "without weights"
    )


def _hf_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of a Hub repo, without touching the network, or None."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True, cache_dir=str(hf_hub_cache_dir()))
    except Exception:  # not cached (LocalEntryNotFoundError), or hub not installed
        return None
    path = Path(path)
    return path if (path / "unet").is_dir() else None


def tiny_models(
    width: int, latent_side: int, image_side: int, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """(UNet2DConditionModel, AutoencoderKL), random, at the sizes the reference verified on
    CPU: a 2-level UNet (width, 2 * width) with cross-attention width `width`, and a VAE
    with scale factor 2 and 4 latent channels.

    Drawn from their own `seed`, not the global RNG: frozen stand-ins are then the same in
    every run and process (their checkpoint hashes match whatever ran before the build)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tiny_unet_and_vae(width, latent_side, image_side)


class LatentDiffusionDecoder(nn.Module, Decoder):
    """Slots condition a Stable Diffusion UNet (StableLSD): denoising in VAE latents."""

    kind = "decoder"
    name = "latent_diffusion"
    Params = LatentDiffusionParams
    # Random tiny UNet and VAE; conditions dropped with p = 0.5, so the learned null
    # embedding trains too.
    conformance = {
        "decoder.tiny": True,
        "decoder.cond_drop_prob": 0.5,
        "objectives": {"denoising": {}},
    }
    output = Denoising
    requires = frozenset({"slots.slots"})
    provides = frozenset({"generation.images"})

    def __init__(self, params: LatentDiffusionParams, dims: Dims):
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        if dims.slot_dim is None or dims.num_slots is None:
            raise ValueError(
                "the latent_diffusion decoder needs the grouping's slot size and count"
            )
        self.params = params
        side = params.image_size or dims.image_size[0]
        self.image_side = (
            (params.image_size, params.image_size) if params.image_size else dims.image_size
        )
        self.source = "tiny" if params.tiny else ""
        text_folder: Path | None = None
        if params.tiny:
            if params.tiny_width % 8:  # 8 GroupNorm groups and 8-channel attention heads
                raise ValueError(f"tiny_width must be a multiple of 8, got {params.tiny_width}")
            if side % 2:
                raise ValueError(f"tiny latent_diffusion needs an even image size, got {side}")
            self.unet, self.vae = tiny_models(params.tiny_width, side // 2, side)
            scheduler = DDPMScheduler(**SD21_SCHEDULER)
        else:
            folder = find_stable_diffusion(params)
            self.source = str(folder)
            load = {"local_files_only": True}
            self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **load)
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **load)
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **load)
            if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
                text_folder = folder
        if params.prediction_type != "scheduler":
            scheduler = DDPMScheduler.from_config(
                scheduler.config, prediction_type=params.prediction_type
            )
        self.scheduler = scheduler
        self.kind_predicted = diffusion.prediction_type(scheduler)
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(params.train_unet)
        if params.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = self.image_side
        if h % self.vae_scale or w % self.vae_scale:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE's {self.vae_scale}")
        self.latent_grid = (h // self.vae_scale, w // self.vae_scale)
        self.latent_channels = int(self.vae.config.latent_channels)

        width = int(self.unet.config.cross_attention_dim)
        self.slot_proj = nn.Sequential(
            nn.LayerNorm(dims.slot_dim) if params.slot_norm else nn.Identity(),
            nn.Linear(dims.slot_dim, width),
        )
        self.null_kind = params.null_condition
        if self.null_kind == "auto":
            has_clip = text_folder is not None and importlib.util.find_spec("transformers")
            self.null_kind = "empty_caption" if has_clip else "learned"
        if self.null_kind == "empty_caption":
            if text_folder is None:
                raise ValueError(
                    "null_condition='empty_caption' needs text_encoder/ and tokenizer/ in the "
                    "Stable Diffusion folder; use 'learned'"
                )
            self.register_buffer(
                "null_embedding", empty_caption(text_folder, dims.num_slots), persistent=False
            )
        else:
            self.null_embedding = nn.Parameter(torch.zeros(dims.num_slots, width))
        self.cache = FeatureCache() if params.cache_latents else None
        self._vae_hash: str | None = None

    def output_dims(self, dims: Dims) -> Dims:
        dims.latent_channels, dims.latent_grid = self.latent_channels, self.latent_grid
        return dims

    # conditioning ------------------------------------------------------------------------
    def condition(self, slots: Tensor) -> Tensor:
        """[B,K,Ds] slots -> [B,K,C] cross-attention context of the UNet."""
        return self.slot_proj(slots)

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The UNet's prediction (of the scheduler's prediction type) at noise level t."""
        return self.unet(x, t, encoder_hidden_states=cond.to(x.dtype)).sample

    # latents -----------------------------------------------------------------------------
    def vae_input(self, images: Tensor) -> Tensor:
        """[0, 1] images at the VAE's resolution in [-1, 1]."""
        if tuple(images.shape[-2:]) != tuple(self.image_side):
            images = F.interpolate(
                images, size=self.image_side, mode="bilinear", antialias=True, align_corners=False
            )
        return images.clamp(0, 1) * 2 - 1

    @torch.no_grad()
    def latent_moments(self, images: Tensor) -> Tensor:
        """[B, 2C, h, w]: the frozen VAE's posterior (mean, logvar), cached when asked."""
        x = self.vae_input(images)
        if self.cache is None:
            return self.vae.encode(x).latent_dist.parameters
        ids = sample_ids(x)
        key = self.cache_key(x.device)
        found = self.cache.lookup(key, ids)
        missing = [i for i, sid in enumerate(ids) if sid not in found]
        if missing:
            rows = torch.tensor(missing, device=x.device)
            computed = self.vae.encode(x[rows]).latent_dist.parameters
            self.cache.put(key, [ids[i] for i in missing], computed)
            for j, i in enumerate(missing):
                found[ids[i]] = computed[j]
        return torch.stack([found[sid].to(x.device, x.dtype) for sid in ids])

    def cache_key(self, device: torch.device) -> str:
        import diffusers

        assert self.cache is not None
        if self._vae_hash is None:
            self._vae_hash = state_sha256(self.vae)
        return self.cache.key(
            encoder="latent_diffusion.vae",
            weights=self._vae_hash,
            image_size=list(self.image_side),
            preprocess=LATENT_PREPROCESS,
            diffusers=diffusers.__version__,
            torch=torch.__version__,
            device=device.type,
            autocast=autocast_dtype(device),  # the VAE's dtype changes the cached moments
        )

    def encode_latents(self, images: Tensor) -> Tensor:
        """Scaled latents z ~ q(z | image) x scaling_factor (LSD samples, not the mean)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(self.latent_moments(images))
        return posterior.sample() * self.scaling_factor

    # training ----------------------------------------------------------------------------
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
        """One denoising training step's prediction and target.

        The step's random inputs can be given instead of drawn (to reproduce another
        code's step exactly; `diffusion_inputs` says what is drawn when not given):
        `latents` [B, C, h, w], the scaled VAE latents z x scaling_factor (the VAE is then
        not run); `noise`, the same shape; `timesteps` long [B] in [0, T). Each one not
        given is drawn from the global RNG, in this order: the condition dropout (training
        with cond_drop_prob > 0 only), the VAE posterior sample, `noise` =
        randn_like(latents), `timesteps` = randint(0, T, (B,)). StableLSD's train_lsd.py
        draws in the same order, but its latents are channels-last on CPU, so randn_like
        there fills another memory order: pass its noise to get its step.
        """
        cond = self.condition(slots.slots)
        if self.training and self.params.cond_drop_prob > 0:
            cond = diffusion.drop_conditions(cond, self.null_embedding, self.params.cond_drop_prob)
        if latents is None:
            latents = self.encode_latents(batch.images)
        noise, t = diffusion_inputs(self.scheduler, latents, noise, timesteps)
        noisy = diffusion.noisy_latents(self.scheduler, latents, noise, t)
        prediction = self.denoise(noisy, t, cond)
        target = diffusion.training_target(self.scheduler, latents, noise, t)
        return Denoising(
            prediction=prediction,
            target=target,
            timesteps=t,
            kind=self.kind_predicted,
            extras={"latents": latents.detach(), "noisy": noisy.detach()},
        )

    # generation --------------------------------------------------------------------------
    def resolved_sampling(
        self, steps: int | None, guidance_scale: float | None
    ) -> tuple[int, float]:
        p = self.params
        return (steps or p.steps, p.guidance_scale if guidance_scale is None else guidance_scale)

    def sampling_protocol(self, steps: int | None, guidance_scale: float | None) -> dict[str, Any]:
        """How generate() samples with these settings: stored beside generation metrics."""
        n, scale = self.resolved_sampling(steps, guidance_scale)
        return {
            "solver": "DPMSolverMultistepScheduler",
            "steps": n,
            "guidance_scale": scale,
            "null_condition": self.null_kind,
            "generated_resolution": list(self.image_side),
            "prediction_type": self.kind_predicted,
            "stable_diffusion": self.source,
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
        """Images [B,3,H,W] in [0, 1] at `image_size`, sampled from the slots alone."""
        n, scale = self.resolved_sampling(steps, guidance_scale)
        cond = self.condition(slots.slots)
        shape = (cond.shape[0], self.latent_channels, *self.latent_grid)
        latents = diffusion.sample_latents(
            self.denoise, self.scheduler, cond, self.null_embedding, shape, n, scale, generator
        )
        images = self.vae.decode(latents / self.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


def diffusion_inputs(
    scheduler: Any, latents: Tensor, noise: Tensor | None, timesteps: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(noise, timesteps) of a training step: the given ones, checked against `latents`,
    else drawn from the global RNG, noise first (randn_like(latents)), then timesteps
    (uniform in [0, num_train_timesteps)). Shared by latent_diffusion and slotdiffusion."""
    if noise is None:
        noise = torch.randn_like(latents)
    elif noise.shape != latents.shape:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, the latents {tuple(latents.shape)}"
        )
    n = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = diffusion.sample_timesteps(scheduler, latents.shape[0], latents.device)
    else:
        if timesteps.shape != (latents.shape[0],) or timesteps.is_floating_point():
            raise ValueError(
                f"timesteps must be integers of shape ({latents.shape[0]},), got "
                f"{timesteps.dtype} {tuple(timesteps.shape)}"
            )
        if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= n):
            raise ValueError(f"timesteps must lie in [0, {n}), got {timesteps.tolist()}")
        timesteps = timesteps.long().to(latents.device)
    return noise.to(latents.device, latents.dtype), timesteps


def empty_caption(folder: Path, num_slots: int) -> Tensor:
    """[K, C]: the SD text encoder's embedding of "" padded/truncated to K tokens, what
    diffusers uses as the unconditional branch for K-token prompt embeddings."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise DataError(
            "null_condition='empty_caption' needs the transformers package; "
            "use decoder.null_condition=learned"
        ) from err
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    ids = tokenizer(
        [""], padding="max_length", max_length=num_slots, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids)[0][0].float()


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [LatentDiffusionDecoder]
