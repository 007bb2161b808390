"""Benchmark: one SlotDiffusion decoder training step (VQ-VAE latents, UNet forward + backward).

"tiny": the CPU stand-ins (decoder.tiny) on 32 px images, B=8, K=4 slots of 32.
"official": SlotDiffusion's COCO sizes (VQ-VAE 64 x [1, 2, 4] -> 56 x 56 x 3 latents,
UNet 128 x (1, 2, 3, 4) with cross-attention at 3 levels, 7 slots of 256) on 224 px
images, B=8, on CUDA when present. The official size runs only with --benchmark-enable
(it takes seconds per step on a CPU); under plain pytest it is skipped and the tiny
body runs once as a test.

Run with
    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_slotdiffusion.py \
        --benchmark-enable --benchmark-min-rounds=3
"""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Batch, Dims, Slots
from ocl_bench.api.params import build_params
from ocl_bench.decoders.slotdiffusion import SlotDiffusionDecoder, SlotDiffusionParams

SIZES = {
    "tiny": {"image": 32, "slots": 4, "slot_dim": 32, "values": {"tiny": True}},
    "official": {"image": 224, "slots": 7, "slot_dim": 256, "values": {}},
}
B = 8


@pytest.mark.parametrize("size", ["tiny", "official"])
def test_slotdiffusion_training_step(benchmark, size: str) -> None:
    if size == "official" and not benchmark.enabled:
        pytest.skip("official sizes run only with --benchmark-enable")
    spec = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    values = {**spec["values"], "vqvae": "random"}
    params = build_params(SlotDiffusionParams, values, "decoder")
    side = spec["image"]
    dims = Dims(image_size=(side, side), slot_dim=spec["slot_dim"], num_slots=spec["slots"])
    dec = SlotDiffusionDecoder(params, dims).to(device).train()
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(B, 3, side, side, generator=g).to(device)
    slot_values = torch.randn(B, spec["slots"], spec["slot_dim"], generator=g).to(device)
    slots = Slots(slots=slot_values.requires_grad_(), attn=torch.zeros(B, 1, spec["slots"]))
    batch = Batch(images=images)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = dec(slots, None, batch)
        loss = (out.prediction - out.target).pow(2).mean()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    loss = benchmark(step)
    assert loss == loss and slots.slots.grad is not None
    info = benchmark.extra_info
    info["size"] = size
    info["device"] = device.type
    info["unet_params_m"] = sum(p.numel() for p in dec.unet.parameters()) / 1e6
    info["torch_threads"] = torch.get_num_threads()
