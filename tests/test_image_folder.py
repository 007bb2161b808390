"""The `image_folder` dataset: unlabelled images from a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ocl_bench.api.errors import DataError
from ocl_bench.datasets.image_folder import ImageFolderDataset

P = ImageFolderDataset.Params


def write(path: Path, width: int, height: int, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write(tmp_path / "b.png", 80, 40, (255, 0, 0))
    write(tmp_path / "a.png", 32, 32, (0, 255, 0))
    write(tmp_path / "sub" / "c.JPG", 50, 100, (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_metadata():
    assert ImageFolderDataset.kind == "dataset" and ImageFolderDataset.name == "image_folder"
    assert ImageFolderDataset.provides == {"batch.images", "batch.index"}
    assert ImageFolderDataset.summary()


def test_loads_sorted_recursive(folder: Path):
    ds = ImageFolderDataset(P(root=str(folder), image_size=16), "train")
    assert len(ds) == 3
    assert [p.name for p in ds.files] == ["a.png", "b.png", "c.JPG"]
    s = ds[1]
    assert set(s) == {"image", "index"} and s["index"] == 1
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    assert torch.allclose(s["image"][:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    blue = ds[2]["image"].mean((1, 2))
    assert blue[2] > 0.9 and blue[0] < 0.1
    batch = ds.collate([ds[0], ds[1], ds[2]])
    assert batch.images.shape == (3, 3, 16, 16)
    assert batch.index.tolist() == [0, 1, 2]
    assert batch.available() == {"batch.images", "batch.index"}


def test_resize_short_side_then_centre_crop(tmp_path: Path):
    # 40x20 image, black outer columns: resized to 20x10, the centre crop keeps columns 10..30
    # of the original, all white (a margin of 4 keeps bilinear bleeding out of the crop).
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, 6:34] = 255
    Image.fromarray(array).save(tmp_path / "x.png")
    image = ImageFolderDataset(P(root=str(tmp_path), image_size=10), "val")[0]["image"]
    assert image.shape == (3, 10, 10)
    assert image.min() > 0.9  # the black borders were cropped away


def test_all_splits_use_the_folder(folder: Path):
    p = P(root=str(folder), image_size=8)
    sets = [ImageFolderDataset(p, s).files for s in ("train", "val", "test")]
    assert sets[0] == sets[1] == sets[2]
    with pytest.raises(ValueError, match="split"):
        ImageFolderDataset(p, "dev")


def test_missing_folder(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        ImageFolderDataset(P(root=str(missing)), "train")


def test_empty_folder(tmp_path: Path):
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(DataError, match=str(tmp_path)):
        ImageFolderDataset(P(root=str(tmp_path)), "train")


def test_unset_root():
    with pytest.raises(DataError, match="root"):
        ImageFolderDataset(P(), "train")


def test_corrupt_image(folder: Path):
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    ds = ImageFolderDataset(P(root=str(folder)), "train")
    index = [p.name for p in ds.files].index("broken.png")
    with pytest.raises(DataError, match="broken.png"):
        ds[index]
    assert ds[0]["image"].shape == (3, 64, 64)  # the others still load


def test_truncated_image(folder: Path):
    good = folder / "a.png"
    data = good.read_bytes()
    cut = folder / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(P(root=str(folder)), "train")
    with pytest.raises(DataError, match="cut.png"):
        ds[[p.name for p in ds.files].index("cut.png")]
