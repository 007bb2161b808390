"""Benchmarks: FID feature extraction at 299 px, one conditional_generation evaluation.

Run with `python -m pytest tests/benchmarks/test_bench_generation.py --benchmark-enable`;
the rates are in extra_info. Under plain pytest (`--benchmark-disable`) each body runs
once on a few images at a small size, as a test of the same code path.

The Inception file is the real architecture with random weights (no download): its speed
is that of the real weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ocl_bench.api.tasking import EvalContext
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import load_config
from ocl_bench.run.data import make_dataset
from ocl_bench.tasks import fid as fidlib
from ocl_bench.tasks.conditional_generation import (
    ConditionalGeneration,
    ConditionalGenerationParams,
)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("inception")
    return fidlib.save_torchscript(fidlib.InceptionV3Graph(), directory / fidlib.INCEPTION_FILE)


def test_fid_feature_extraction_299(benchmark, inception_file: Path) -> None:
    count, resolution = (16, 299) if benchmark.enabled else (2, fidlib.MIN_RESOLUTION)
    extractor = fidlib.load_extractor(inception_file)
    images = torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = benchmark.pedantic(
        fidlib.extract_features,
        args=(extractor, images, resolution, 16),
        rounds=3,
        warmup_rounds=1,
    )
    assert feats.shape == (count, fidlib.FEATURE_DIM) and np.isfinite(feats).all()
    if benchmark.enabled:
        benchmark.extra_info["images_per_second"] = count / benchmark.stats.stats.mean


def test_conditional_generation_64_images_mlp(benchmark, inception_file: Path, tmp_path) -> None:
    """The default config (MLP decoder on pixels, 64 px shapes) with the reference
    statistics already cached: what evaluating a trained run again costs."""
    count, resolution = (64, 299) if benchmark.enabled else (8, fidlib.MIN_RESOLUTION)
    cfg = load_config(None, [f"dataset.val_size={count}"])
    assert cfg.decoder.name == "mlp"
    data = make_dataset(cfg.dataset, "val")
    torch.manual_seed(0)
    model = build_model(cfg, data.image_size).eval()
    ctx = EvalContext(
        model=model,
        dataset=lambda split: data,
        split="val",
        num_images=count,
        batch_size=32,
        device=torch.device("cpu"),
        progress=False,
        out_dir=tmp_path,
    )
    task = ConditionalGeneration(
        ConditionalGenerationParams(
            fid="required",
            inception_path=str(inception_file),
            fid_resolution=resolution,
            fid_cache=str(tmp_path / "fid-cache"),
            figure_images=8,
        )
    )
    first = task.evaluate(ctx)  # writes the reference statistics; warms TorchScript up
    assert first.info["fid_reference_cached"] is False
    result = benchmark.pedantic(task.evaluate, args=(ctx,), rounds=2)
    values = {r.metric: r.value for r in result.records}
    assert set(values) == {"psnr", "ssim", "fid"} and np.isfinite(values["fid"])
    assert result.info["fid_reference_cached"] is True
    if benchmark.enabled:
        benchmark.extra_info["images_per_second"] = count / benchmark.stats.stats.mean
