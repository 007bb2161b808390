"""A grid's leaderboard states its conclusion from the stored data: which neighbours in
the ranking of its first column are resolved, and the order that follows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ocl_bench.grid import load_grid
from ocl_bench.leaderboard import load_leaderboard, render
from ocl_bench.store import Cell, ResultStore

GRID = """
name = "tiny-conclusion"
columns = ["fg_ari"]
masks = "decoder"
seeds = 2
[axes]
"decoder.hidden" = [8, 16, 32]
[labels."decoder.hidden"]
8 = "narrow"
16 = "medium"
32 = "wide"
"""


def _store_grid(tmp_path: Path, shift: dict[int, float], grid: str = GRID) -> tuple[Path, Path]:
    """The grid's cells stored with per-image FG-ARI: row mean = base + shift[hidden]."""
    path = tmp_path / "g.toml"
    path.write_text(grid)
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    rng = np.random.default_rng(0)
    base = {seed: rng.uniform(0.3, 0.7, size=64) for seed in (0, 1)}
    for cell in load_grid(path).cells:
        cfg = cell.config
        values = base[cfg.seed] + shift[cfg.decoder.params.hidden] + rng.normal(0, 0.01, 64)
        digest = cfg.digest()
        store.start(
            Cell(digest, cfg.to_dict(), {}, "shapes", "val", cfg.seed, "running", "g", cell.label)
        )
        record = {
            "task": "object_discovery",
            "metric": "fg_ari",
            "masks": "decoder",
            "value": float(values.mean()),
            "num_images": 64,
            "per_image": list(values),
        }
        store.complete(digest, [record])
    return path, db


def test_a_clear_lead_is_resolved_and_a_tie_is_not(tmp_path: Path) -> None:
    path, db = _store_grid(tmp_path, {8: 0.0, 16: 0.002, 32: 0.08})
    board = load_leaderboard(path, db)
    assert len(board.conclusion) == 3
    wide, medium = board.conclusion[0], board.conclusion[1]
    assert wide.startswith("wide vs medium") and wide.endswith(": resolved")
    assert medium.startswith("medium vs narrow") and medium.endswith(": not resolved")
    assert "2 seeds" in wide and "128 pairs" in wide
    assert board.conclusion[2].endswith("wide > medium ~ narrow")
    text = render(board, "md")
    assert "Conclusion:\n- wide vs medium" in text
    assert json.loads(render(board, "json"))["conclusion"] == board.conclusion
    assert "<section class='conclusion'>" in render(board, "html")


def test_the_conclusion_follows_the_data(tmp_path: Path) -> None:
    # The same grid with the ranking reversed: the sentences change with the numbers.
    path, db = _store_grid(tmp_path, {8: 0.1, 16: 0.05, 32: 0.0})
    board = load_leaderboard(path, db)
    assert board.conclusion[-1].endswith("narrow > medium > wide")
    assert all(line.endswith(": resolved") for line in board.conclusion[:2])


def test_one_seed_says_what_its_intervals_leave_out(tmp_path: Path) -> None:
    path, db = _store_grid(tmp_path, {8: 0.0, 16: 0.002, 32: 0.08})
    two_seeds = load_leaderboard(path, db).conclusion
    single = tmp_path / "single"
    single.mkdir()
    path, db = _store_grid(single, {8: 0.0, 16: 0.002, 32: 0.08}, GRID.replace("seeds = 2", ""))
    one_seed = load_leaderboard(path, db).conclusion
    assert "1 seed)" in one_seed[0] and one_seed[-1].startswith("One seed:")
    assert not any(line.startswith("One seed:") for line in two_seeds)


def test_no_database_no_conclusion(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    board = load_leaderboard(path, tmp_path / "missing.sqlite")
    assert board.conclusion == [] and "Conclusion" not in render(board, "md")
