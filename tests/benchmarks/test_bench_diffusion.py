"""Benchmarks: a StableLSD training step and sampling with the latent_diffusion decoder.

Run with `python -m pytest tests/benchmarks/test_bench_diffusion.py --benchmark-enable`;
rates are in extra_info. Under plain pytest (`--benchmark-disable`) each body runs once
on a small batch, as a test of the same code path.

The tiny stand-ins are random diffusers UNet2DConditionModel / AutoencoderKL at the sizes
the reference verified on CPU. The SD 2.1-sized step builds the real architectures from
their configs (random weights: the speed is that of the real ones) and needs a GPU.
"""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Batch, Dims, Progress, Slots
from ocl_bench.decoders.latent_diffusion import LatentDiffusionDecoder, LatentDiffusionParams
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_config
from ocl_bench.run.data import make_dataset

TINY_LSD = [
    "dataset.image_size=32",
    "dataset.train_size=16",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "encoder.dim=16",
    "grouping.num_slots=4",
    "grouping.slot_dim=32",
    "grouping.mlp_hidden=32",
    "grouping.position=cartesian",
    "decoder.name=latent_diffusion",
    "decoder.tiny=true",
    "objectives={denoising={}}",
    'tasks={object_discovery={masks=["attn"]}}',
]


def _training_step(model: torch.nn.Module, objectives, batch, precision: torch.dtype | None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    device = batch.images.device

    def step() -> float:
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            out = model(batch)
            loss = sum(sum(o(out, batch, Progress(0, 1)).values()) for o in objectives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def test_stablelsd_training_step_tiny(benchmark) -> None:
    batch_size = 8 if benchmark.enabled else 2
    cfg = load_config(None, TINY_LSD)
    data = make_dataset(cfg.dataset, "train")
    batch = data.collate([data[i] for i in range(batch_size)])
    torch.manual_seed(0)
    model = build_model(cfg, data.image_size).train()
    step = _training_step(model, build_objectives(cfg), batch, None)
    first = step()
    loss = benchmark(step)
    benchmark.extra_info["images_per_step"] = batch_size
    assert loss == loss and loss < first * 10  # finite


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SD 2.1-sized step needs a CUDA GPU")
def test_stablelsd_training_step_sd21_sizes_gpu(benchmark) -> None:
    """Slot projection 768 -> 1024 into SD 2.1's UNet and VAE architectures at 256 px, fp16
    autocast, frozen UNet and VAE: StableLSD's per-GPU step without its DINOv2 (batch 32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = torch.device("cuda")
    batch_size = 32 if benchmark.enabled else 2
    dec = LatentDiffusionDecoder(
        LatentDiffusionParams(tiny=True, image_size=256),
        Dims(image_size=(448, 448), slot_dim=768, num_slots=7),
    )
    # stabilityai/stable-diffusion-2-1 unet/config.json and vae/config.json architectures
    dec.unet = UNet2DConditionModel(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ).requires_grad_(False)
    dec.vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=768,
    ).requires_grad_(False)
    dec.vae_scale = 8
    dec.latent_grid = (32, 32)
    dec.slot_proj[1] = torch.nn.Linear(768, 1024)
    dec = dec.to(device).train()
    slots = Slots(
        slots=torch.randn(batch_size, 7, 768, device=device), attn=torch.zeros(batch_size, 1, 7)
    )
    batch = Batch(images=torch.rand(batch_size, 3, 448, 448, device=device))
    optimizer = torch.optim.AdamW(dec.slot_proj.parameters(), lr=2e-5)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.float16):
            out = dec(slots, None, batch)
            loss = (out.prediction.float() - out.target.float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        return float(loss.detach())

    step()
    loss = benchmark(step)
    benchmark.extra_info["images_per_step"] = batch_size
    assert loss == loss


def test_tiny_pipeline_sampling_images_per_second(benchmark) -> None:
    count, steps = (8, 25) if benchmark.enabled else (2, 2)
    torch.manual_seed(0)
    dec = LatentDiffusionDecoder(
        LatentDiffusionParams(tiny=True), Dims(image_size=(32, 32), slot_dim=32, num_slots=4)
    ).eval()
    slots = Slots(slots=torch.randn(count, 4, 32), attn=torch.zeros(count, 1, 4))

    def sample() -> torch.Tensor:
        return dec.generate(
            slots, steps=steps, guidance_scale=1.3, generator=torch.Generator().manual_seed(0)
        )

    images = benchmark.pedantic(sample, rounds=3, warmup_rounds=1)
    assert images.shape == (count, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    if benchmark.enabled:
        benchmark.extra_info["images_per_second"] = count / benchmark.stats.stats.mean
        benchmark.extra_info["steps"] = steps
