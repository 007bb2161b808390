"""Benchmark: the main job, `ocl-bench grid` on the embedded demo, timed end to end beside the
machine's slot-attention figure, and checked against its budget and its promises.

The budget (issue 19): the demo grid in at most 6 minutes on a 2-core machine whose
slot-attention benchmark reads 35 ms, scaled by this machine's own figure (measured here,
in this process, before and after the grid: the lower is taken). The grid runs in a
subprocess exactly as the README's first command runs it, on a fresh database. It also
checks what the README says of the result: at least 3 seeds per row, the best row's mean
FG-ARI at 0.6 or more, and a Conclusion whose resolved steps hold at seed level.

    OMP_NUM_THREADS=1 python -m pytest tests/benchmarks/test_bench_demo_grid.py \
        --benchmark-enable -s

It takes about 10 minutes on two cores, so it runs only with benchmarks enabled; the record
(wall and CPU seconds, the figure, per-row FG-ARI) goes to pytest-benchmark's extra_info
(`--benchmark-json` writes it) and is printed.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ocl_bench.api.contracts import Features
from ocl_bench.groupings.slot_attention import Dims, SlotAttention, SlotAttentionParams
from ocl_bench.report.compare import compare_rows
from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.run.boards import demo_grid_path, load_grid
from ocl_bench.run.store import ResultStore
from tests.benchmarks.timing import one_torch_thread

BUDGET_S = 6 * 60  # on a machine whose slot-attention benchmark reads REFERENCE_MS
REFERENCE_MS = 35.0
MIN_SEEDS = 3
MIN_BEST_FG_ARI = 60.0  # percent, as the board shows it


def slot_attention_ms(rounds: int = 12) -> float:
    """The min over `rounds` of tests/benchmarks/test_bench_training.py's slot-attention
    forward (SPOT ViT-B sizes), in ms, on one thread as docs/benchmarks.md measures it."""
    with one_torch_thread():
        torch.manual_seed(0)
        params = SlotAttentionParams(num_slots=7, slot_dim=256, mlp_hidden=1024, pre_mlp=True)
        dims = Dims(image_size=(224, 224), grid=(14, 14), token_dim=768)
        sa = SlotAttention(params, dims).eval()
        feats = Features(tokens=torch.randn(8, 196, 768), grid=(14, 14))
        times = []
        with torch.no_grad():
            sa(feats)
            for _ in range(rounds):
                start = time.perf_counter()
                sa(feats)
                times.append(time.perf_counter() - start)
        return min(times) * 1000


def test_demo_grid_within_budget_with_its_promises(benchmark, tmp_path: Path) -> None:
    if benchmark.disabled:
        pytest.skip("the demo grid takes ~10 min: run with --benchmark-enable")
    figure_before = slot_attention_ms()
    db, runs = tmp_path / "demo.sqlite", tmp_path / "runs"
    command = [sys.executable, "-m", "ocl_bench.cli", "grid", "--db", str(db), "--runs", str(runs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCL_BENCH_")}

    def run() -> tuple[float, float]:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert done.returncode == 0, done.stderr[-2000:]
        print(done.stdout)
        return wall, (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)

    wall, cpu = benchmark.pedantic(run, rounds=1, iterations=1)
    figure = min(figure_before, slot_attention_ms())
    budget = BUDGET_S * figure / REFERENCE_MS

    board = load_leaderboard(demo_grid_path(), db)
    fg_ari = {row.label: row.spreads["fg_ari"] for row in board.rows}
    seeds = {label: spread.n for label, spread in fg_ari.items()}
    benchmark.extra_info.update(
        {
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "slot_attention_ms": round(figure, 1),
            "budget_s": round(budget, 1),
            "fg_ari": {label: round(s.mean, 2) for label, s in fg_ari.items()},
            "seeds": seeds,
        }
    )
    print(f"\ndemo grid: {wall:.0f} s wall, {cpu:.0f} s CPU; slot attention {figure:.1f} ms;")
    print(f"budget {budget:.0f} s (6 min at {REFERENCE_MS:.0f} ms, scaled)")
    assert wall <= budget, f"the demo grid took {wall:.0f} s, over its {budget:.0f} s budget"
    assert min(seeds.values()) >= MIN_SEEDS, seeds
    assert max(s.mean for s in fg_ari.values()) >= MIN_BEST_FG_ARI
    # every resolved step of the Conclusion holds at seed level (>= 3 shared seeds, paired t)
    grid = load_grid(demo_grid_path())
    hashes = {c.row: c.config.digest() for c in grid.cells}
    store = ResultStore(db)
    for line in board.conclusion:
        if not line.endswith(": resolved"):
            continue
        a, b = line.split(": ")[0].split(" vs ")
        comparison = compare_rows(store, hashes[a], hashes[b])
        assert comparison.resolved and len(comparison.seeds) >= MIN_SEEDS, line
