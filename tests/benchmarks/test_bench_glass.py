"""Benchmarks: GLASS pseudo-mask extraction and the guidance loss.

Run with `python -m pytest tests/benchmarks/test_bench_glass.py --benchmark-enable -s`;
rates are in extra_info. Under plain pytest (`--benchmark-disable`) each body runs once, as
a test of the same code path.

- pseudo-mask extraction: one generated item (prompt -> image + recorded attention ->
  refined label map) with the tiny random pipeline on CPU; at SD 2.1 sizes (768 px, the real
  UNet/VAE architectures from their configs, random weights, 50 steps) on a GPU only;
- the guidance loss forward + backward at 32x32 slot masks, batch 32, 7 slots (GLASS's COCO
  setting): matching (Hungarian on the CPU) included.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ocl_bench.datasets.generated.captions import Prompt  # noqa: E402
from ocl_bench.datasets.generated.generate import Recipe, generate_item, tiny_pipeline  # noqa: E402
from ocl_bench.objectives.glass_guidance import guidance_loss  # noqa: E402


def test_pseudo_mask_extraction_tiny(benchmark, tmp_path) -> None:
    steps = 10 if benchmark.enabled else 2
    pipe = tiny_pipeline(32, 32, tmp_path / "tok")
    pipe.set_progress_bar_config(disable=True)
    recipe = Recipe(tiny=True, steps=steps, image_size=32)
    prompt = Prompt("a red circle and a blue square", ("circle", "square"))
    rgb, labels, spans = benchmark(generate_item, pipe, prompt, 0, recipe, 32)
    assert rgb.shape == (32, 32, 3) and labels.shape == (32, 32) and len(spans) == 2
    if benchmark.enabled:
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info["images_per_s"] = 1 / seconds
        print(f"\ntiny pseudo-mask extraction, {steps} steps: {1 / seconds:.2f} images/s")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SD 2.1 sizes need a GPU")
def test_pseudo_mask_extraction_sd21_sizes(benchmark) -> None:  # pragma: no cover - GPU
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    pipe = tiny_pipeline(32, 64, __import__("pathlib").Path("/tmp/ocl-bench-tok"))
    unet = UNet2DConditionModel(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        sample_size=768,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(pipe.tokenizer.get_vocab()),
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
        )
    )
    big = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to("cuda", torch.float16)
    big.set_progress_bar_config(disable=True)
    recipe = Recipe(steps=50, image_size=768)
    prompt = Prompt("a dog and a cat", ("dog", "cat"))
    benchmark.pedantic(generate_item, (big, prompt, 0, recipe, 768), rounds=3)
    benchmark.extra_info["images_per_s"] = 1 / benchmark.stats.stats.mean


def test_guidance_loss_forward_backward(benchmark) -> None:
    batch = 32 if benchmark.enabled else 4
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 32 * 32, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (batch, 32, 32), generator=g)
    segs = torch.stack([labels == k for k in range(1, 5)], 1)
    ignored = torch.rand(batch, 32, 32, generator=g) < 0.05

    def step() -> float:
        logits.grad = None
        loss, _ = guidance_loss(logits.softmax(-1), segs, ignored)
        loss.backward()
        return float(loss)

    loss = benchmark(step)
    assert loss > 0 and logits.grad is not None and logits.grad.abs().sum() > 0
    if benchmark.enabled:
        benchmark.extra_info["batches_per_s"] = 1 / benchmark.stats.stats.mean
        ms = 1000 * benchmark.stats.stats.mean
        print(f"\nguidance loss fwd+bwd, batch {batch}, 32x32, K=7: {ms:.1f} ms")
