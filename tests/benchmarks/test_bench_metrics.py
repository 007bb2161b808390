"""Throughput of the object discovery metrics (all five at once, via ``all_metrics``).

Target: >= 500 images/second on 2 CPU cores at 320x320 with 7 slots and up to 10 objects.
Measure with ``python -m pytest tests/benchmarks --benchmark-enable``; the result is recorded in
``extra_info["images_per_second"]``. Under plain pytest (``--benchmark-disable``) the metrics run
once and only the output checks apply.
"""

from __future__ import annotations

import pytest
import torch

from ocl_bench.tasks.object_discovery_metrics import (
    METRIC_NAMES,
    all_metrics,
    ignore_overlaps,
    masks_to_pred,
)

BATCH, SIZE, SLOTS, MAX_OBJECTS, PATCHES = 64, 320, 7, 10, 14


def _scene(generator: torch.Generator) -> torch.Tensor:
    """bool[MAX_OBJECTS, SIZE, SIZE]: visible parts of random ellipses and rectangles, painted
    back to front, zero-padded; a few objects (transparent ones) keep their occluded part."""
    ys = torch.arange(SIZE, dtype=torch.float32).view(SIZE, 1)
    xs = torch.arange(SIZE, dtype=torch.float32).view(1, SIZE)
    masks = torch.zeros(MAX_OBJECTS, SIZE, SIZE, dtype=torch.bool)
    covered = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    count = int(torch.randint(0, MAX_OBJECTS + 1, (1,), generator=generator))
    for m in reversed(range(count)):  # front to back: each object only gets uncovered pixels
        cy, cx = (torch.rand(2, generator=generator) * SIZE).tolist()
        ry, rx = (8 + torch.rand(2, generator=generator) * SIZE / 4).tolist()
        if torch.rand(1, generator=generator).item() < 0.5:
            shape = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        else:
            shape = ((ys - cy).abs() <= ry) & ((xs - cx).abs() <= rx)
        transparent = torch.rand(1, generator=generator).item() < 0.1
        masks[m] = shape if transparent else shape & ~covered
        covered |= shape
    return masks


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    gt = torch.stack([_scene(generator) for _ in range(BATCH)])
    # Soft slot masks at patch resolution that loosely follow the objects, as a model's would.
    coarse = torch.nn.functional.adaptive_avg_pool2d(gt.float(), PATCHES)  # [B, M, 14, 14]
    logits = torch.randn(BATCH, SLOTS, PATCHES, PATCHES, generator=generator)
    for m in range(MAX_OBJECTS):
        logits[:, m % SLOTS] += 4 * coarse[:, m]
    pred = masks_to_pred(logits.softmax(1), (SIZE, SIZE))
    border = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.bool)
    border[:, :3] = True  # e.g. VOC's 255 ("void") label
    return pred, gt, ignore_overlaps(gt, border)


def test_bench_all_metrics(benchmark, batch):
    pred, gt, ignore = batch
    result = benchmark(all_metrics, pred, gt, ignore, num_slots=SLOTS)

    assert set(result) == set(METRIC_NAMES)
    has_objects = (gt & ~ignore[:, None]).flatten(2).any(2).any(1)
    assert 0 < int(has_objects.sum()) < BATCH  # the batch includes images without objects
    for name, values in result.items():
        assert values.shape == (BATCH,), name
        assert values.dtype == torch.float64, name
        if name == "fg_ari":
            assert values.isfinite().all()
            assert (values[~has_objects] == 1.0).all()
        else:
            assert values[has_objects].isfinite().all(), name
            assert values[~has_objects].isnan().all(), name
        assert ((values[values.isfinite()] >= -1) & (values[values.isfinite()] <= 1)).all()
    assert (result["miou"][has_objects] <= result["mbo"][has_objects] + 1e-12).all()
    assert result["mbo"][has_objects].mean() > 0.2  # slots follow objects (noise gives ~0.08)

    benchmark.extra_info.update(batch=BATCH, size=SIZE, slots=SLOTS, max_objects=MAX_OBJECTS)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if benchmark.stats:
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info["images_per_second"] = BATCH / seconds
        print(f"\nall_metrics: {BATCH / seconds:.0f} images/s (mean), ", end="")
        print(f"{BATCH / benchmark.stats.stats.median:.0f} images/s (median)")
