"""What makes the demo grid quick without changing what it computes: kept samples of
`shapes`, a grid file's suggested worker count, one core's share of threads per worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ocl_bench.api.errors import ConfigError
from ocl_bench.datasets.shapes import ShapesDataset
from ocl_bench.run.grid import load_grid, share_cores

P = ShapesDataset.Params


def _same(a: dict, b: dict) -> bool:
    tensors = ("image", "instance_masks", "class_masks", "boxes", "labels", "class_ids")
    return (
        all(torch.equal(a[k], b[k]) for k in tensors)
        and all(torch.equal(a["properties"][k], b["properties"][k]) for k in a["properties"])
        and a["caption"] == b["caption"]
    )


def test_kept_samples_equal_drawn_ones() -> None:
    kept = ShapesDataset(P(image_size=32, train_size=20, cache=5), "train")
    drawn = ShapesDataset(P(image_size=32, train_size=20), "train")
    for index in [3, 7, 3, 12, 7, 0, 1, 2, 19, 3]:
        assert _same(kept[index], drawn[index])
    # bounded: the first five distinct indices are kept, later ones drawn every time
    assert sorted(kept._kept) == [0, 1, 3, 7, 12]
    assert drawn._kept == {}


def test_a_caller_editing_its_sample_leaves_the_kept_one_intact() -> None:
    ds = ShapesDataset(P(image_size=32, train_size=4, cache=4), "train")
    first = ds[1]
    first["caption"] = "edited"
    first["properties"]["shape"] = torch.zeros(0)
    again = ds[1]
    assert again["caption"] != "edited" and len(again["properties"]["shape"]) > 0


def test_the_cache_is_a_resumable_setting() -> None:
    from ocl_bench.run.train import RESUMABLE_CHANGES

    assert ("dataset", "cache") in RESUMABLE_CHANGES


def _grid(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "g.toml"
    path.write_text(f'name = "w"\n{extra}\n[axes]\n"decoder.hidden" = [8, 16]\n')
    return path


def test_a_grid_file_suggests_its_workers(tmp_path: Path) -> None:
    assert load_grid(_grid(tmp_path, "workers = 2")).workers == 2
    assert load_grid(_grid(tmp_path, "")).workers == 1
    for bad in ("workers = 0", "workers = true", 'workers = "2"'):
        with pytest.raises(ConfigError, match="workers"):
            load_grid(_grid(tmp_path, bad))


def test_the_demo_grid_runs_its_cells_in_parallel_on_one_thread_each() -> None:
    demo = load_grid()
    assert demo.workers == 2
    cells = demo.cells
    # three training seeds per row, the fewest that can resolve a difference (issue 19);
    # with three rows the ninth cell runs alone in the last wave
    rows: dict[str, int] = {}
    for cell in cells:
        rows[cell.row] = rows.get(cell.row, 0) + 1
    assert set(rows.values()) == {3}
    assert all(c.config.train.threads == 0 for c in cells)  # share_cores decides


def test_each_worker_gets_its_share_of_the_cores() -> None:
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        share_cores(2)
        assert torch.get_num_threads() == max(1, cores // 2)
        share_cores(10 * cores)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
