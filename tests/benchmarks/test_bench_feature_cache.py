"""Benchmark: a frozen ViT encoder pass with and without the on-disk feature cache.

    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_feature_cache.py \
        --benchmark-enable --benchmark-group-by=param:size

"tiny" is the test-size ViT (width 32, depth 2, 32x32 input); "vit_ti" a ViT-Ti/16
shape (width 192, depth 12, 3 heads, 224x224 input, as the real encoders see). Both take
a batch of 8 64x64 shapes images (resized by the encoder). The cached pass hashes the
images and reads the shards; it never runs the ViT. Under plain pytest each body runs
once as a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ocl_bench.api.contracts import Dims
from ocl_bench.datasets.shapes import ShapesDataset
from ocl_bench.encoders.vit import ENCODERS, ViTParams
from tests.benchmarks.timing import one_torch_thread

SIZES = {
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "image_size": 32},
    "vit_ti": {"embed_dim": 192, "depth": 12, "num_heads": 3, "image_size": 224},
}
BATCH = 8


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("size", list(SIZES))
def test_frozen_vit_pass(
    benchmark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str, cached: bool
) -> None:
    monkeypatch.setenv("OCL_BENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    params = ViTParams(random_init=True, cache=cached, **SIZES[size])
    data = ShapesDataset(ShapesDataset.Params(image_size=64), "train")
    batch = data.collate([data[i] for i in range(BATCH)])  # 64x64, resized by the encoder
    with one_torch_thread():
        enc = ENCODERS["dino_vits16"](params, Dims(image_size=(64, 64)))
        calls: list[int] = []
        enc.vit.patch_embed.register_forward_hook(lambda m, a, o: calls.append(1))
        first = enc(batch).tokens  # fills the cache when enabled
        tokens = benchmark(lambda: enc(batch).tokens)
    assert torch.equal(tokens, first)
    if cached:
        assert len(calls) == 1  # only the warm-up pass ran the ViT
    benchmark.extra_info.update(size=size, cached=cached, batch=BATCH, tokens=list(tokens.shape))
