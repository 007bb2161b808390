"""Benchmark: one training step of the default run, data included, against the old path.

The old path is the default run as it was before it was made cheap (a 64-channel CNN, a
128-wide MLP decoder, batch 16) with every sample drawn again at every step. The printed
ratios (old / new CPU time of this process per step and per image, measured in
alternation) are what show a regression; absolute times differ between machines. Each
fails below its floor (STEP_FLOOR, IMAGE_FLOOR: docs/benchmarks.md and bench/configs/default.toml
state them), whether or not benchmarks are enabled: the body runs at the real sizes.

    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_default_step.py \
        --benchmark-enable -s

Under plain pytest (benchmarks disabled) the body runs once as a test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ocl_bench.api.contracts import Progress
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_config
from ocl_bench.run.data import StepBatchSampler, make_dataset
from tests.benchmarks.timing import interleaved_cpu_seconds

# The default run before this benchmark existed, as overrides of today's default.
OLD_DEFAULT = [
    "dataset.cache=0",
    "encoder.channels=64",
    "decoder.hidden=128",
    "train.batch_size=16",
]
# Least old / new CPU time per step and per image (measured 3.90x and 1.95x on a loaded
# 2-core machine). The previous default's batch is twice today's, so per image = per step / 2.
STEP_FLOOR = 3.0
IMAGE_FLOOR = 1.5


def _trainer(overrides: list[str], warm: bool) -> Callable[[], float]:
    """One optimiser step of the default loop's work: draw and collate the step's batch,
    forward, loss, backward, AdamW step. `warm`: the dataset's cache already holds the
    samples (a run past its first epoch; a no-op without a cache)."""
    cfg = load_config(None, overrides)
    dataset = make_dataset(cfg.dataset, "train")
    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size, cfg.seed, 0, 10**6)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.image_size)
    objectives = build_objectives(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    steps = iter(range(10**6))
    if warm:
        for step in range(8):
            for i in sampler.indices(step):
                dataset[i]

    def step() -> float:
        indices = sampler.indices(next(steps) % 8)
        batch = dataset.collate([dataset[i] for i in indices])
        out = model(batch)
        loss = sum(sum(o(out, batch, Progress(0, 1)).values()) for o in objectives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def test_default_step_against_old_path(benchmark) -> None:
    new, old = _trainer([], warm=True), _trainer(OLD_DEFAULT, warm=False)
    first = new()
    old()
    times = interleaved_cpu_seconds({"new": new, "old": old}, rounds=6)
    new_times, old_times = times["new"], times["old"]
    ratio = min(old_times) / min(new_times)
    batches = load_config().train.batch_size, load_config(None, OLD_DEFAULT).train.batch_size
    per_image = ratio * batches[0] / batches[1]
    loss = benchmark(new)
    benchmark.extra_info["old_over_new_cpu_time"] = round(ratio, 2)
    benchmark.extra_info["old_over_new_cpu_time_per_image"] = round(per_image, 2)
    print(
        f"\ndefault step: {min(new_times) * 1e3:.0f} ms CPU, old path {min(old_times) * 1e3:.0f}"
        f" ms CPU: {ratio:.2f}x faster per step, {per_image:.2f}x per image"
    )
    assert loss == loss and loss < first * 2  # finite and not exploding
    assert ratio >= STEP_FLOOR, f"old / new per step {ratio:.2f}x < {STEP_FLOOR}x"
    assert per_image >= IMAGE_FLOOR, f"old / new per image {per_image:.2f}x < {IMAGE_FLOOR}x"
