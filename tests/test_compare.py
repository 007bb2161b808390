"""`ocl-bench compare`: seed-level paired differences of stored rows, with a within-seed
view over their images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ocl_bench.api.errors import UserError
from ocl_bench.cli import main
from ocl_bench.report.compare import compare_rows
from ocl_bench.run.store import Cell, ResultStore


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


def _rows(
    tmp_path: Path,
    shift: float,
    per_image: bool = True,
    seeds: int = 3,
    seed_sd: float = 0.005,
) -> ResultStore:
    """Rows a and b on the same images per seed: a = b + shift + a seed effect (SD
    `seed_sd`, what training with another seed moves) + small per-image noise."""
    store = ResultStore(tmp_path / "r.sqlite")
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        base = rng.uniform(0.3, 0.7, size=40)
        noise = rng.normal(0, 0.01, size=40)
        a = list(base + shift + rng.normal(0, seed_sd) + noise)
        b = list(base)
        b[3] = math.nan  # skipped image: its pair is dropped
        _store_row(store, "a", seed, a if per_image else None, float(np.mean(a)))
        _store_row(store, "b", seed, b if per_image else None, float(np.nanmean(b)))
    return store


def test_a_clear_lead_is_resolved_over_seeds(tmp_path: Path) -> None:
    found = compare_rows(_rows(tmp_path, shift=0.05), "decoder.name=a", "decoder.name=b")
    assert found.seeds == [0, 1, 2] and found.result.n == 3
    # the verdict pairs the stored per-seed values (each a mean over images)
    differences = np.array(found.values_a) - np.array(found.values_b)
    assert found.result.difference == pytest.approx(differences.mean())
    assert found.result.difference == pytest.approx(0.05, abs=0.01)
    assert found.result.ci_low > 0 and found.result.p_value < 0.01
    assert found.resolved and "A is higher (resolved over seeds)" in found.text()
    # the within-seed view is there, labelled, over the image pairs (NaN pairs dropped)
    assert found.within is not None and found.within.images == 3 * 40 - 3
    assert "descriptive, within-seed, not the verdict" in found.text()
    assert "seeds needed" not in found.text()


def test_identical_rows_are_never_called_different(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.0)
    found = compare_rows(store, "decoder.name=b", "decoder.name=b")
    assert found.result.difference == 0 and found.result.p_value == 1.0
    assert not found.resolved and "not resolved" in found.text()
    assert "the difference is 0: no number of seeds resolves it" in found.text()


def test_without_per_image_values_the_verdict_is_the_same(tmp_path: Path) -> None:
    with_images = compare_rows(_rows(tmp_path, 0.05), "decoder.name=a", "decoder.name=b")
    (tmp_path / "bare").mkdir()
    store = _rows(tmp_path / "bare", shift=0.05, per_image=False)
    found = compare_rows(store, "decoder.name=a", "decoder.name=b")
    assert found.within is None and "within" not in found.text()
    assert found.result == with_images.result and found.resolved


def test_two_seeds_never_resolve_and_say_how_many_would(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.05, seeds=2, seed_sd=0.02)
    found = compare_rows(store, "decoder.name=a", "decoder.name=b")
    assert found.result.n == 2 and not found.resolved
    # however tight the images make it look: the within-seed view leaves out 0
    assert found.within is not None and found.within.ci_low > 0
    assert "2 shared seeds give the seed-to-seed variance one degree of freedom" in found.text()
    assert found.seeds_needed is not None and found.seeds_needed >= 3
    assert f"about {found.seeds_needed} seeds would resolve +0.0" in found.text()


def test_one_pair_never_resolves(tmp_path: Path) -> None:
    store = _rows(tmp_path, shift=0.05, per_image=False, seeds=1)
    found = compare_rows(store, "decoder.name=a", "decoder.name=b")
    assert found.result.n == 1 and not found.resolved and found.seeds_needed is None
    assert "1 shared seed gives no seed-to-seed variance" in found.text()
    assert "one seed gives no seed-level SD" in found.text()


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
    assert out["resolved"] and out["result"]["p_value"] < 0.01 and out["result"]["n"] == 3
    assert out["metric"] == "object_discovery.fg_ari" and out["reason"] == ""
    assert out["within"]["method"].startswith("hierarchical bootstrap")
    assert {"seeds_needed", "seeds_needed_text", "values_a"} <= set(out)
    assert main(["compare", str(tmp_path / "missing.sqlite"), "a", "b"]) == 2
    assert "results database not found" in capsys.readouterr().err
