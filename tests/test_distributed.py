"""torchrun with two gloo processes matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import TINY

# Learned queries: no sampled slot noise, so both runs see exactly the same computation
# up to the order of floating-point reductions.
ARGS = [
    *TINY,
    "train.steps=4",
    "train.batch_size=8",
    "grouping.init=learned_queries",
    "train.threads=1",
]


def test_two_gloo_processes_match_single_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ocl_bench.cli",
            "train",
            "--out",
            str(single),
            "--no-eval",
            "-q",
            *ARGS,
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "ocl_bench.cli",
            "train",
            "--out",
            str(multi),
            "--no-eval",
            "-q",
            *ARGS,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )

    def losses(run: Path) -> torch.Tensor:
        lines = (run / "train_log.jsonl").read_text().splitlines()
        return torch.tensor([json.loads(line)["loss"] for line in lines])

    # Rank 0 logs the loss averaged over both ranks: the global-batch loss, step by step.
    one, two = losses(single), losses(multi)
    assert len(one) == len(two) == 4
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)
    # DDP averages the two half-batch gradients, which equals the full-batch mean gradient
    # up to summation order. Adam turns a near-zero gradient into a step of about +-lr
    # whatever its size, so a parameter whose gradient is pure rounding noise can differ by
    # at most steps * 2 * lr = 4 * 2 * 4e-4 (warm-up makes the real bound smaller). A wrong
    # split (each rank training on the whole batch, or on the same half) breaks the loss
    # check above.
    a = load_file(str(single / "checkpoint" / "model.safetensors"))
    b = load_file(str(multi / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 4 * 2 * 4e-4, worst
