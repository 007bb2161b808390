"""Benchmarks: one training step of the default config, slot attention forward.

Run with `python -m pytest tests/benchmarks --benchmark-enable`; under plain pytest each
body runs once as a test.
"""

from __future__ import annotations

import torch

from ocl_bench.api.contracts import Dims, Features, Progress
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_config
from ocl_bench.run.data import make_dataset


def test_default_training_step(benchmark) -> None:
    cfg = load_config()
    dataset = make_dataset(cfg.dataset, "train")
    batch = dataset.collate([dataset[i] for i in range(cfg.train.batch_size)])
    torch.manual_seed(0)
    model = build_model(cfg, dataset.image_size)
    objectives = build_objectives(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)

    def step() -> float:
        out = model(batch)
        loss = sum(sum(o(out, batch, Progress(0, 1)).values()) for o in objectives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    first = step()
    loss = benchmark(step)
    benchmark.extra_info["images_per_step"] = cfg.train.batch_size
    assert loss == loss and loss < first * 2  # finite and not exploding


def test_slot_attention_forward(benchmark) -> None:
    torch.manual_seed(0)
    params = SlotAttentionParams(num_slots=7, slot_dim=256, mlp_hidden=1024, pre_mlp=True)
    sa = SlotAttention(params, Dims(image_size=(224, 224), grid=(14, 14), token_dim=768)).eval()
    feats = Features(tokens=torch.randn(8, 196, 768), grid=(14, 14))

    def forward():
        with torch.no_grad():
            return sa(feats)

    out = benchmark(forward)
    benchmark.extra_info["shape"] = "B=8, N=196, D=768, K=7, Ds=256 (SPOT ViT-B sizes)"
    assert out.attn.shape == (8, 196, 7)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(8, 196))
