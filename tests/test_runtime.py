"""Device and precision settings."""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Progress
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.runtime import autocast, resolve_device
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_config
from ocl_bench.run.data import StepBatchSampler, make_dataset
from tests.conftest import TINY


def test_bf16_autocast_runs_the_model_in_bf16_and_stays_close_to_fp32() -> None:
    cfg = load_config(None, TINY)
    data = make_dataset(cfg.dataset, "train")
    batch = data.collate([data[i] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(cfg, data.image_size).eval()
    (objective,) = build_objectives(cfg)
    seen = []
    model.decoder.net[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    torch.manual_seed(1)
    full = objective(model(batch), batch, Progress(0, 1))["reconstruction"].detach()
    torch.manual_seed(1)
    with autocast(torch.device("cpu"), "bf16"):
        half = objective(model(batch), batch, Progress(0, 1))["reconstruction"].detach()
    assert seen == [torch.float32, torch.bfloat16]
    assert half.dtype == torch.float32  # the objective computes in fp32
    assert abs(half.item() - full.item()) < 0.05 * full.item()


def test_fp16_on_cpu_and_missing_cuda_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        with autocast(torch.device("cpu"), "fp16"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_step_batches_depend_only_on_seed_and_step() -> None:
    a = StepBatchSampler(10, 4, seed=3, start=0, stop=6)
    b = StepBatchSampler(10, 4, seed=3, start=2, stop=6)
    assert list(a)[2:] == list(b)
    # every epoch visits every index once
    flat = [i for batch in StepBatchSampler(12, 4, seed=0, start=0, stop=3) for i in batch]
    assert sorted(flat) == list(range(12))
    # two processes split the global batch without overlap
    r0 = StepBatchSampler(10, 4, seed=3, start=0, stop=6, rank=0, world=2)
    r1 = StepBatchSampler(10, 4, seed=3, start=0, stop=6, rank=1, world=2)
    for whole, x, y in zip(a, r0, r1):
        assert x + y == whole
