"""`ocl-bench compare`: paired differences of stored rows over seeds and images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ocl_bench.cli import main
from ocl_bench.compare import compare_rows
from ocl_bench.errors import UserError
from ocl_bench.store import Cell, ResultStore


def _store_row(
    store: ResultStore, name: str, seed: int, per_image: list[float] | None, value: float
) -> None:
    config = {"seed": seed, "decoder": {"name": name}}
    digest = f"{name}{seed:04d}hash"
    label = f"decoder.name={name}, seed={seed}"
    store.start(Cell(digest, config, {}, "shapes", "val", seed, "running", "g", label))
    record = {
        "task": "object_discovery",
        "metric": "fg_ari",
        "masks": "decoder",
        "value": value,
        "num_images": len(per_image or []),
    }
    if per_image is not None:
        record["per_image"] = per_image
    store.complete(digest, [record])


def _rows(tmp_path: Path, shift: float, per_image: bool = True, seeds: int = 3) -> ResultStore:
    store = ResultStore(tmp_path / "r.sqlite")
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        base = rng.uniform(0.3, 0.7, size=40)
        noise = rng.normal(0, 0.01, size=40)
        a = list(base + shift + noise)
        b = list(base)
        b[3] = math.nan  # skipped image: its pair is dropped
        _store_row(store, "a", seed, a if per_image else None, float(np.mean(a)))
        _store_row(store, "b", seed, b if per_image else None, float(np.nanmean(b)))
    return store


def test_a_clear_lead_is_resolved_over_seed_image_pairs(tmp_path: Path) -> None:
    found = compare_rows(_rows(tmp_path, shift=0.05), "decoder.name=a", "decoder.name=b")
    assert found.unit == "seed x image" and found.seeds == [0, 1, 2]
    assert found.pairs == 3 * 40 - 3
    assert found.result.difference == pytest.approx(0.05, abs=0.005)
    assert found.result.ci_low > 0 and found.result.p_value < 0.001
    assert found.resolved and "A is higher" in found.text()


def test_identical_rows_are_never_called_different(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.0)
    found = compare_rows(store, "decoder.name=b", "decoder.name=b")
    assert found.result.difference == 0 and found.result.p_value == 1.0
    assert not found.resolved and "not resolved" in found.text()


def test_without_per_image_values_rows_pair_on_seeds(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.05, per_image=False)
    found = compare_rows(store, "decoder.name=a", "decoder.name=b")
    assert found.unit == "seed" and found.pairs == 3
    # three seeds: the exact sign-flip test cannot go below 2 / 2**3, so however clear
    # the lead looks, three values alone do not resolve it
    assert found.result.p_value == pytest.approx(0.25)
    assert found.result.ci_low > 0 and not found.resolved
    assert "not resolved: p = 0.25 with 3 pairs" in found.text()


def test_one_pair_never_resolves(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.05, per_image=False, seeds=1)
    found = compare_rows(store, "decoder.name=a", "decoder.name=b")
    assert found.pairs == 1 and not found.resolved


def test_rows_by_hash_prefix_and_errors(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.05, seeds=1)
    assert compare_rows(store, "a0000", "b0000").seeds == [0]
    with pytest.raises(UserError, match="no complete row 'nope'.*decoder.name=a"):
        compare_rows(store, "nope", "b0000")


def test_cli_prints_difference_interval_and_p_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _rows(tmp_path, shift=0.05)
    db = str(tmp_path / "r.sqlite")
    assert main(["compare", db, "decoder.name=a", "decoder.name=b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resolved"] and out["result"]["p_value"] < 0.001
    assert out["metric"] == "object_discovery.fg_ari"
    assert main(["compare", str(tmp_path / "missing.sqlite"), "a", "b"]) == 2
    assert "results database not found" in capsys.readouterr().err
