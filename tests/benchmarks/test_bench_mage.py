"""Benchmarks: one thesis stage-2 training step and one MaskGIT decoding step, MAGE ViT-B.

Stage-2 step at the thesis' sizes with random weights: B=8 images of 256 px, the official
VQGAN (ids, frozen), MAGE ViT-B/16 frozen (the visible pass for the slots and the masked
pass: 1 + 128 tokens), slot attention (7 slots of 256), the MAGE decoder (8 blocks x 16
heads over 257 + 7 tokens), label-smoothed masked CE, backward and an AdamW step.
Decoding step: one MaskGIT iteration (encoder on 257 ids, decoder, sampling, re-masking)
for B=8 from 7 slots.

Run with
    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_mage.py \
        --benchmark-enable --benchmark-min-rounds=3
Under plain pytest (`--benchmark-disable`) each body runs once at tiny sizes, as a test
of the same code path.
"""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Batch, Progress
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import load_raw, resolve
from tests.benchmarks.run_gpu_benchmarks import TINY_MAGE

VIT_B = ["dataset.image_size=256", "encoder.image_size=256", "grouping.num_slots=7"]
TINY = ["dataset.image_size=32", *TINY_MAGE, "decoder.depth=2", "decoder.num_heads=2"]
SHAPE = "B=8, 256 px, VQGAN 16x16 ids, MAGE ViT-B/16 frozen + decoder 8x16 heads, K=7 x 256"


def _model(full: bool):
    torch.manual_seed(0)
    overrides = [
        "encoder.name=mage_vitb16",
        "encoder.random_init=true",
        "encoder.masking=mage",
        "grouping.name=slot_attention",
        "decoder.name=mage",
        *(VIT_B if full else TINY),
    ]
    raw = load_raw(None, overrides)
    raw["objectives"] = {"token_cross_entropy": {"label_smoothing": 0.1}}
    cfg = resolve(raw)
    size = 256 if full else 32
    model = build_model(cfg, (size, size))
    objective = cfg.objectives[0].cls(cfg.objectives[0].params)
    return model, objective, size


def test_mage_stage2_training_step(benchmark) -> None:
    full = not benchmark.disabled
    model, objective, size = _model(full)
    model.train()
    batch = Batch(images=torch.rand(8 if full else 2, 3, size, size))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step() -> float:
        optimiser.zero_grad(set_to_none=True)
        loss = objective(model(batch), batch, Progress(0, 1))["token_cross_entropy"]
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    loss = benchmark(step)
    assert loss == loss and loss > 0
    assert all(not p.requires_grad for p in model.encoder.parameters())
    benchmark.extra_info["shape"] = SHAPE if full else "tiny"


def test_maskgit_decoding_step(benchmark) -> None:
    full = not benchmark.disabled
    model, _, size = _model(full)
    model.eval()
    with torch.no_grad():
        slots = model(Batch(images=torch.rand(8 if full else 2, 3, size, size))).slots

    def step() -> torch.Tensor:
        return model.decoder.sample_ids(
            slots.slots, steps=1, generator=torch.Generator().manual_seed(0)
        )

    ids = benchmark(step)
    assert int((ids == model.decoder.vocab.mask_id).sum()) == 0
    benchmark.extra_info["shape"] = SHAPE if full else "tiny"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "--benchmark-enable"])
