"""Benchmark: the `vqgan` tokenizer's encode (images -> ids) at 256 px, official sizes.

MAGE's VQGAN (ch 128, ch_mult 1,1,2,2,4, 2 residual blocks per level, 1024 x 256 codebook),
random init, one 256x256 image -> 16x16 ids, one torch thread. "cached"
reads the ids from the feature cache filled by a first pass (what a frozen-tokenizer
grid pays per batch after its first epoch). images/s = batch / mean seconds.

    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_tokenizer.py \
        --benchmark-enable --benchmark-min-rounds=3

Under plain pytest each body runs once as a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ocl_bench.image_tokenizers.vqgan import VQGANParams, VQGANTokenizer
from ocl_bench.run.feature_cache import FeatureCache
from tests.benchmarks.timing import one_torch_thread

BATCH, SIDE = 1, 256


@pytest.mark.parametrize("cached", [False, True], ids=["encode", "cached"])
def test_vqgan_encode_256px(benchmark, tmp_path: Path, cached: bool) -> None:
    torch.manual_seed(0)
    tok = VQGANTokenizer(VQGANParams(random_init=True))
    images = torch.rand(BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    cache = FeatureCache(tmp_path / "cache") if cached else None
    with one_torch_thread():
        if cached:
            first = tok.encode_cached(images, cache)  # fills the cache
        ids = benchmark(lambda: tok.encode_cached(images, cache))
    assert ids.shape == (BATCH, 16, 16) and int(ids.max()) < 1024
    if cached:
        assert torch.equal(ids, first)
    info = benchmark.extra_info
    info.update(cached=cached, batch=BATCH, image_side=SIDE, torch_threads=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # only when benchmarking is enabled
        info["images_per_s"] = BATCH / stats.stats.mean
