"""Slot libraries: k-means recovers separable clusters; `ocl-bench slot-library` saves
centroids with provenance in the run directory and fails in one line on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ocl_bench.run.config import load_config
from ocl_bench.run.slot_library import (
    build_library,
    fit_centroids,
    library_file,
    load_library,
    nearest_centroids,
)
from ocl_bench.run.train import train
from tests.test_cli_errors import cli, user_error

TINY_RUN = [
    "dataset.image_size=32",
    "dataset.train_size=12",
    "dataset.val_size=4",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "encoder.dim=16",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "decoder.hidden=16",
    "train.steps=2",
    "train.batch_size=4",
    "train.threads=1",
    "eval.batch_size=4",
]


def separable_slots(per_cluster: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, cluster ids, true centres): 6 tight clusters far apart in 8 dims."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 8)).astype(np.float32) * 20
    ids = np.repeat(np.arange(6), per_cluster)
    slots = centres[ids] + rng.standard_normal((len(ids), 8)).astype(np.float32) * 0.1
    return slots, ids, centres


def test_kmeans_recovers_separable_clusters() -> None:
    slots, ids, centres = separable_slots(200)
    found, settings = fit_centroids(slots, 6, batch_size=64, epochs=2, seed=0, progress=False)
    # every true centre has a centroid within the noise, and each cluster maps to one id
    dist = np.linalg.norm(centres[:, None] - found[None], axis=-1)
    assert dist.min(axis=1).max() < 0.5
    assigned = nearest_centroids(torch.from_numpy(slots), torch.from_numpy(found)).numpy()
    for c in range(6):
        assert len(set(assigned[ids == c])) == 1
    assert len(set(assigned)) == 6
    assert settings["used_centroids"] == 6 and settings["mean_squared_distance"] < 0.1


def test_nearest_centroids_is_the_euclidean_argmin() -> None:
    gen = torch.Generator().manual_seed(0)
    slots, centroids = torch.randn(2, 5, 4, generator=gen), torch.randn(7, 4, generator=gen)
    ids = nearest_centroids(slots, centroids)
    brute = ((slots[..., None, :] - centroids) ** 2).sum(-1).argmin(-1)
    assert torch.equal(ids, brute)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("lib") / "run"
    train(load_config(None, TINY_RUN), run, progress=False)
    return run


def test_library_of_a_run_is_saved_with_provenance(tiny_run: Path) -> None:
    library = build_library(tiny_run, 5, batch_size=8, epochs=2, seed=3, progress=False)
    assert library.path == library_file(tiny_run, 5) and library.path.is_file()
    again = load_library(tiny_run)
    assert torch.equal(again.centroids, library.centroids)
    assert again.centroids.shape == (5, 16)
    p = again.provenance
    assert p["slots"] == 12 * 3 and p["images"] == 12 and p["split"] == "train"
    assert p["centroids"] == 5 and p["seed"] == 3 and p["step"] == 2
    assert p["config_hash"] == load_config(tiny_run / "config.toml").digest()
    assert json.loads(json.dumps(p)) == p


def test_cli_makes_a_library_and_fails_in_one_line(tiny_run: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "slot-library", str(tiny_run), "--centroids", "4", "-q")
    assert result.returncode == 0, result.stderr
    assert "4 centroids of 36 slots" in result.stdout
    assert load_library(tiny_run, 4).size == 4
    too_many = cli(tmp_path, "slot-library", str(tiny_run), "--centroids", "500", "-q")
    user_error(too_many, "36 slots", "500 centroids")


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["nowhere", "--centroids", "4"], "nowhere"), (["RUN", "--centroids", "0"], "--centroids")],
)
def test_bad_run_or_count_is_one_line_in_process(
    tiny_run: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    from ocl_bench.cli import main

    args = [str(tiny_run) if a == "RUN" else a for a in args]
    assert main(["slot-library", *args, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ocl-bench: error:") and "\n" not in err and needle in err


def test_loading_a_missing_or_foreign_library_fails_in_one_line(tmp_path: Path) -> None:
    from ocl_bench.api.errors import DataError

    with pytest.raises(DataError, match="no single slot library"):
        load_library(tmp_path)
    bad = tmp_path / "k3.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a slot library"):
        load_library(bad)
    with pytest.raises(DataError, match="dimension 4"):
        nearest_centroids(torch.zeros(2, 4), torch.zeros(3, 5))


def test_conditional_generation_scores_generation_from_nearest_centroids(
    tiny_run: Path, tmp_path: Path
) -> None:
    from ocl_bench.api.errors import DataError
    from ocl_bench.api.runtime import seed_everything
    from ocl_bench.api.tasking import EvalContext
    from ocl_bench.run.data import make_dataset
    from ocl_bench.run.evaluate import load_run
    from ocl_bench.tasks.conditional_generation import (
        ConditionalGeneration,
        ConditionalGenerationParams,
    )

    library = build_library(tiny_run, 3, batch_size=8, epochs=1, progress=False)
    cfg, model, _ = load_run(tiny_run)
    seen: list[torch.Tensor] = []
    generate = model.decoder.generate

    def recording(slots, **kw):
        seen.append(slots.slots.clone())
        return generate(slots, **kw)

    model.decoder.generate = recording
    ctx = EvalContext(
        model=model,
        dataset=lambda split: make_dataset(cfg.dataset, split),
        split="val",
        num_images=4,
        batch_size=4,
        device=torch.device("cpu"),
        progress=False,
        out_dir=tmp_path,
    )
    build_library(tiny_run, 2, batch_size=8, epochs=1, progress=False)
    # with several libraries in the run, a run directory is ambiguous: name the file
    with pytest.raises(DataError, match="no single slot library"):
        load_library(tiny_run)
    params = ConditionalGenerationParams(fid="off", figure_images=2, slot_library=str(library.path))
    seed_everything(0)
    result = ConditionalGeneration(params).evaluate(ctx)
    got = {r.metric: r for r in result.records}
    assert {"psnr", "ssim", "centroid_psnr", "centroid_ssim"} <= set(got)
    assert got["centroid_psnr"].protocol["slot_library"]["centroids"] == 3
    # calls: the slots, the recombined figure row, then the nearest centroids of the slots
    own, centroid = seen[0], seen[2]
    expected = library.centroids[nearest_centroids(own, library.centroids)]
    torch.testing.assert_close(centroid, expected)
    assert any(f.endswith("conditional_generation_centroids.png") for f in result.figures)
    assert (tmp_path / "figures" / "conditional_generation_centroids.png").is_file()
