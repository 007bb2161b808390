"""Benchmarks: each family's training step at its paper size on a CUDA GPU.

SPOT (spot-coco), DINOSAUR (dinosaur-mlp-coco), MAGE stage 2 (thesis-stage2), StableLSD
(stablelsd), GLASS (glass-coco), SlotDiffusion (slotdiffusion-coco) and SLATE (slate), each
trained for a few steps by the harness's trainer with random weights at the paper's sizes on
synthetic images at the paper's resolution: tests/benchmarks/run_gpu_benchmarks.py says
exactly what is built and measured, and runs the same families as a script.

    python -m pytest tests/benchmarks/test_bench_gpu_steps.py --benchmark-enable \
        --benchmark-json=gpu-pytest.json -s

Each family's images/s, data-wait fraction, peak memory (torch.cuda.max_memory_allocated),
precision and batch go to extra_info, with the torch / CUDA versions and the GPU's name;
pytest-benchmark's own time columns time the whole short run, set-up included, so compare
two such files with `python tests/benchmarks/run_gpu_benchmarks.py --compare OLD NEW`,
which reads the extra_info. Without a CUDA GPU every test skips, naming CUDA; without
--benchmark-enable they skip too (minutes per family). tests/test_gpu_benchmarks.py runs
the same code at tiny sizes on the CPU in every test run.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.benchmarks.run_gpu_benchmarks import (
    CUDA_SKIP,
    FAMILIES,
    environment,
    run_family,
    summary,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One work directory for the module: StableLSD and GLASS share the random SD 2.1
    folder, removed afterwards (pytest keeps its last temporary directories, and the folder
    holds 3.6 GB)."""
    path = tmp_path_factory.mktemp("gpu-steps")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_paper_size_training_step(benchmark, family: str, work: Path) -> None:
    if benchmark.disabled:
        pytest.skip("paper-size steps take minutes per family: run with --benchmark-enable")
    benchmark.group = "gpu training step"
    record = benchmark.pedantic(run_family, args=(family, work), rounds=1, iterations=1)
    benchmark.extra_info.update(record)
    benchmark.extra_info["environment"] = environment("cuda")
    print(f"\n{family}: {summary(record)}")
    assert record["images_per_s"] > 0 and math.isfinite(record["loss"])
    assert 0.0 <= record["data_wait"] <= 1.0
    assert record["peak_memory_bytes"] > 0
