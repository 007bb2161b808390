"""Per-image metric values in the results store: written with a cell, read back, migrated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ocl_bench.report.stats import summarize
from ocl_bench.run.grid import load_grid, run_grid
from ocl_bench.run.store import SCHEMA, Cell, ResultStore
from tests.conftest import TINY, execute, write_old_store

NAN = float("nan")


def _record(metric: str, masks: str | None, values: list[float]) -> dict:
    finite = [v for v in values if not math.isnan(v)]
    return {
        "task": "object_discovery",
        "metric": metric,
        "masks": masks,
        "value": sum(finite) / len(finite),
        "num_images": len(finite),
        "per_image": values,
    }


def test_per_image_values_round_trip_with_nan_for_skipped_images(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    store.start(Cell("abc", {}, {}, "shapes", "val", 0, "running"))
    store.complete(
        "abc",
        [
            _record("miou", "attn", [0.25, NAN, 0.75]),
            _record("miou", "decoder", [0.5, NAN, 1.0]),
            _record("fg_ari", "decoder", [0.1, 0.2, 0.3]),
            {"task": "t", "metric": "no_images", "value": 2.0},  # a record without them
        ],
    )
    cell = store.get("abc", per_image=True)
    decoder = cell.image_values("object_discovery", "miou")  # decoder masks when unnamed
    np.testing.assert_array_equal(decoder, [0.5, NAN, 1.0])
    attn = cell.image_values("object_discovery", "miou", "attn")
    np.testing.assert_array_equal(attn, [0.25, NAN, 0.75])
    assert cell.image_values("t", "no_images") is None
    assert cell.image_values("object_discovery", "absent") is None
    assert summarize(decoder).n == 2
    # Not read unless asked: a leaderboard of many cells loads only what it needs.
    assert store.get("abc").image_values("object_discovery", "miou") is None
    # Completing again replaces the values instead of adding to them.
    store.complete("abc", [_record("miou", "decoder", [0.9, 0.8])])
    again = store.cells(per_image=True)[0]
    np.testing.assert_array_equal(again.image_values("object_discovery", "miou"), [0.9, 0.8])
    assert again.image_values("object_discovery", "fg_ari") is None


def test_per_image_values_of_a_replaced_run_are_deleted_with_it(store_db: Path | str) -> None:
    store = ResultStore(store_db)
    store.start(Cell("abc", {}, {}, "shapes", "val", 0, "running"))
    store.complete("abc", [_record("miou", "decoder", [0.5, 0.6])])
    execute(store_db, "UPDATE cells SET status = 'failed'")
    store.start(Cell("abc", {}, {}, "shapes", "val", 1, "running"))  # the rerun replaces it
    assert execute(store_db, "SELECT COUNT(*) FROM per_image") == [(0,)]


def test_an_old_database_gains_the_per_image_table_and_reads_no_values(
    store_db: Path | str,
) -> None:
    path = store_db
    write_old_store(path, SCHEMA.split("CREATE TABLE IF NOT EXISTS per_image")[0])
    store = ResultStore(path)
    old = store.get("old", per_image=True)
    assert old.value("object_discovery", "fg_ari") == 0.25
    assert old.image_values("object_discovery", "fg_ari") is None
    store.start(Cell("new", {}, {}, "shapes", "val", 0, "running"))
    store.complete("new", [_record("fg_ari", "decoder", [0.5, 0.7])])
    new = ResultStore(path).get("new", per_image=True)
    np.testing.assert_array_equal(new.image_values("object_discovery", "fg_ari"), [0.5, 0.7])


def test_a_grid_cell_stores_object_discovery_values_per_image(
    tmp_path: Path, store_db: Path | str
) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        """
name = "one"
[base]
tasks = { object_discovery = { masks = ["attn"], class_masks = false } }
[base.train]
steps = 2
[axes]
"grouping.num_slots" = [3]
"""
    )
    overrides = [o for o in TINY if not o.startswith("tasks.")]
    db, runs = store_db, tmp_path / "runs"
    assert list(run_grid(load_grid(path, overrides), db, runs, progress=False).values()) == [
        "complete"
    ]
    cell = ResultStore(db).cells(per_image=True)[0]
    for record in cell.metrics:
        values = cell.image_values(record["task"], record["metric"], record["masks"])
        assert values is not None and values.shape == (16,)  # eval.num_images
        finite = values[~np.isnan(values)]
        assert finite.size == record["num_images"]
        assert abs(finite.mean() - record["value"]) < 1e-12
    # metrics.json stays a summary: the per-image values live only in the store.
    saved = json.loads((Path(cell.run_dir) / "metrics.json").read_text())
    assert saved["records"] and all("per_image" not in r for r in saved["records"])
