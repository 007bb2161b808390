"""Shared pieces of the slot-conditioned diffusion decoders (a helper module, not a plugin).

Every UNet, VAE, noise schedule and solver is a diffusers object; this module only wires
them the way slot decoders use them:

- `sample_timesteps` / `training_target`: DDPM training, noise added by the scheduler and
  the target chosen by its `prediction_type` (epsilon, v_prediction or sample), as the
  official LSD / SlotDiffusion training loops do;
- `drop_conditions`: replace whole slot sets by the null condition with probability p, so
  the null embedding learns what classifier-free guidance needs;
- `sample_latents`: DPM-Solver multistep (or another diffusers solver) from Gaussian noise,
  with classifier-free guidance over an explicit null condition and a seeded generator.

Conditions are cross-attention contexts [B, K, C]; a null condition is [K, C] or [B, K, C].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

# (noisy latents [B,C,h,w], timesteps long[B], condition [B,K,C]) -> model output [B,C,h,w]
DenoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler: Any) -> str:
    """What the model predicts, as the scheduler config says (SD 2.1: 'v_prediction')."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"unsupported prediction_type {kind!r}; expected one of {PREDICTION_TYPES}"
        )
    return kind


def sample_timesteps(
    scheduler: Any, batch_size: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """long[B] drawn uniformly from [0, num_train_timesteps), as LSD's train loop does."""
    n = scheduler.config.num_train_timesteps
    draw_on = generator.device if generator is not None else device
    return torch.randint(0, n, (batch_size,), generator=generator, device=draw_on).to(device)


def training_target(scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """The regression target at `timesteps` for the scheduler's prediction type:
    the noise (epsilon), the velocity alpha_t * noise - sigma_t * x0 (v_prediction) or
    the clean latents (sample)."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def noisy_latents(scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """q(x_t | x_0): the scheduler's forward process."""
    return scheduler.add_noise(latents, noise, timesteps)


def drop_conditions(
    cond: Tensor, null_cond: Tensor, p: float, generator: torch.Generator | None = None
) -> Tensor:
    """`cond` [B,K,C] with each sample's whole condition replaced by `null_cond` with
    probability p (classifier-free guidance training). p = 0 returns `cond` itself."""
    if p <= 0:
        return cond
    b = cond.shape[0]
    dev = generator.device if generator is not None else cond.device
    drop = (torch.rand(b, generator=generator, device=dev) < p).to(cond.device)
    null = null_cond.to(cond.dtype).expand_as(cond)
    return torch.where(drop[:, None, None], null, cond)


def make_solver(scheduler: Any, solver: type = DPMSolverMultistepScheduler, **options: Any) -> Any:
    """A fresh sampling scheduler with the training scheduler's noise schedule and
    prediction type (solvers keep per-run state, so every sampling call builds its own)."""
    return solver.from_config(scheduler.config, **options)


def guided(
    denoise: DenoiseFn, x: Tensor, t: Tensor, cond: Tensor, null_cond: Tensor | None, scale: float
) -> Tensor:
    """Classifier-free guidance: null + scale * (cond - null), both branches in one batch.
    scale == 1 (or no null condition) is the conditional prediction alone, one UNet call."""
    if scale == 1.0 or null_cond is None:
        return denoise(x, t, cond)
    null = null_cond.to(cond.dtype).expand_as(cond)
    both = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond]))
    uncond, conditional = both.chunk(2)
    return uncond + scale * (conditional - uncond)


@torch.no_grad()
def sample_latents(
    denoise: DenoiseFn,
    scheduler: Any,
    cond: Tensor,
    null_cond: Tensor | None,
    shape: tuple[int, ...],
    steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    solver: type = DPMSolverMultistepScheduler,
    solver_options: dict[str, Any] | None = None,
    on_step: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Latents [B, ...] = `shape` sampled from noise with `steps` solver steps.

    `scheduler` supplies the noise schedule and prediction type (its config); `denoise`
    returns what that type predicts. The initial noise comes from `generator` (on the CPU
    or on `cond`'s device), so a seeded generator gives the same latents every call.
    `on_step(latents, i)` may rewrite the latents after step i (e.g. re-quantise them).
    """
    sampler = make_solver(scheduler, solver, **(solver_options or {}))
    device = cond.device
    sampler.set_timesteps(steps, device=device)
    x = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
    x = x * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        t_batch = t.expand(shape[0]).to(device)
        model_in = sampler.scale_model_input(x, t)
        out = guided(denoise, model_in, t_batch, cond, null_cond, guidance_scale)
        x = sampler.step(out, t, x, generator=generator).prev_sample
        if on_step is not None:
            x = on_step(x, i)
    return x


__all__ = [
    "PREDICTION_TYPES",
    "DenoiseFn",
    "drop_conditions",
    "guided",
    "make_solver",
    "noisy_latents",
    "prediction_type",
    "sample_latents",
    "sample_timesteps",
    "training_target",
]
