"""encoder.frozen_precision: the frozen ViT under bf16/fp16 autocast, tokens back in fp32."""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Batch, Dims
from ocl_bench.api.errors import ConfigError
from ocl_bench.encoders.vit import ENCODERS, ViTParams
from ocl_bench.run.feature_cache import FeatureCache

TINY = {"random_init": True, "embed_dim": 48, "depth": 2, "num_heads": 3, "image_size": 64}


def _encoder(**values) -> torch.nn.Module:
    torch.manual_seed(0)
    return ENCODERS["dino_vits16"](ViTParams(**TINY, **values), Dims(image_size=(64, 64)))


def test_bf16_frozen_tokens_are_fp32_and_within_tolerance() -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = _encoder()(Batch(images=images)).tokens
        low = _encoder(frozen_precision="bf16")(Batch(images=images)).tokens
    assert low.dtype == torch.float32 and low.shape == exact.shape
    error = (low - exact).norm() / exact.norm()
    assert 0 < error < 2e-2  # really computed in bf16, and still close


def test_fp16_needs_cuda() -> None:
    encoder = _encoder(frozen_precision="fp16")
    with pytest.raises(ConfigError, match="needs CUDA"):
        encoder(Batch(images=torch.rand(1, 3, 64, 64)))


def test_the_precision_is_part_of_the_cache_key(tmp_path) -> None:
    keys = set()
    for precision in ("fp32", "bf16"):
        encoder = _encoder(frozen_precision=precision)
        encoder.cache = FeatureCache(tmp_path)
        keys.add(encoder.cache_key(torch.device("cpu")))
    assert len(keys) == 2
