"""A grid's leaderboard states its conclusion from the stored data: which neighbours in
the ranking of its first column are resolved, and the order that follows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.report.render import render
from ocl_bench.run.grid import load_grid
from ocl_bench.run.store import Cell, ResultStore

GRID = """
name = "tiny-conclusion"
columns = ["fg_ari"]
masks = "decoder"
seeds = 3
[axes]
"decoder.hidden" = [8, 16, 32]
[labels."decoder.hidden"]
8 = "narrow"
16 = "medium"
32 = "wide"
"""


def _store_grid(
    tmp_path: Path, shift: dict[int, float], grid: str = GRID, seed_sd: float = 0.005
) -> tuple[Path, Path]:
    """The grid's cells stored with per-image FG-ARI: a seed's images (shared by every
    row) + shift[hidden] + that row's seed effect (SD `seed_sd`) + image noise."""
    path = tmp_path / "g.toml"
    path.write_text(grid)
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    rng = np.random.default_rng(0)
    base = {seed: rng.uniform(0.3, 0.7, size=64) for seed in range(8)}
    for cell in load_grid(path).cells:
        cfg = cell.config
        effect = shift[cfg.decoder.params.hidden] + rng.normal(0, seed_sd)
        values = base[cfg.seed] + effect + rng.normal(0, 0.01, 64)
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
    path, db = _store_grid(tmp_path, {8: 0.0, 16: 0.0, 32: 0.08})
    board = load_leaderboard(path, db)
    assert len(board.conclusion) == 3
    lead, tie = board.conclusion[0], board.conclusion[1]
    assert lead.startswith("wide vs ") and lead.endswith(": resolved")
    assert "paired t over 3 seeds" in lead and "within-seed view (descriptive)" in lead
    assert "over 192 images" in lead
    assert ": not resolved (the seed-level interval includes 0; about " in tie
    assert re.search(r"about \d+ seeds would resolve [+-]\d", tie)  # what its size needs
    assert re.search(r"wide > (medium ~ narrow|narrow ~ medium)$", board.conclusion[2])
    text = render(board, "md")
    assert f"Conclusion:\n- {lead}" in text
    assert json.loads(render(board, "json"))["conclusion"] == board.conclusion
    assert "<section class='conclusion'>" in render(board, "html")


def test_the_conclusion_follows_the_data(tmp_path: Path) -> None:
    # The same grid with the ranking reversed: the sentences change with the numbers.
    path, db = _store_grid(tmp_path, {8: 0.1, 16: 0.05, 32: 0.0})
    board = load_leaderboard(path, db)
    assert board.conclusion[-1].endswith("narrow > medium > wide")
    assert all(line.endswith(": resolved") for line in board.conclusion[:2])


def test_seed_luck_inside_each_seed_is_not_resolved(tmp_path: Path) -> None:
    # No real difference between the rows, but each cell's seed effect (SD 5 points) moves
    # all 64 of its images together: the images alone would look decisive, the seeds not.
    path, db = _store_grid(tmp_path, {8: 0.0, 16: 0.0, 32: 0.0}, seed_sd=0.05)
    board = load_leaderboard(path, db)
    assert not any(line.endswith(": resolved") for line in board.conclusion[:2])
    assert board.conclusion[2].endswith("~ " + board.conclusion[1].split(" vs ")[1].split(":")[0])


def test_fewer_than_three_seeds_never_resolve_and_say_why(tmp_path: Path) -> None:
    path, db = _store_grid(tmp_path, {8: 0.0, 16: 0.002, 32: 0.08})
    three_seeds = load_leaderboard(path, db).conclusion
    for seeds, phrase in (("seeds = 2", "paired t over 2 seeds"), ("", "over 1 seed: no interval")):
        where = tmp_path / (seeds or "single").replace(" = ", "")
        where.mkdir()
        grid = GRID.replace("seeds = 3", seeds)
        path, db = _store_grid(where, {8: 0.0, 16: 0.002, 32: 0.08}, grid)
        lines = load_leaderboard(path, db).conclusion
        assert phrase in lines[0] and ": not resolved (" in lines[0]
        order = lines[-2].split(": ", 1)[1]
        assert order.startswith("wide ~") and ">" not in order  # a clear lead, unresolved
        assert lines[-1].startswith("Fewer than 3 shared seeds never resolve a difference")
    assert not any(line.startswith("Fewer than 3") for line in three_seeds)


def test_no_database_no_conclusion(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    board = load_leaderboard(path, tmp_path / "missing.sqlite")
    assert board.conclusion == [] and "Conclusion" not in render(board, "md")
