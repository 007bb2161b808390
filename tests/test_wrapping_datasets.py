"""A dataset plugin built from another one declares `wrapped_setting`, and leaderboard rows
on it take the column's dataset and the command line's dataset settings through it: a
second wrapping dataset, defined here, needs nothing of ocl_bench.run.boards beyond that."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

import ocl_bench.run.boards
import ocl_bench.run.config
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.params import param
from ocl_bench.api.plugin import Dataset
from ocl_bench.run.boards import Row, row_raw
from ocl_bench.run.config import resolve
from ocl_bench.run.grid import load_grid
from ocl_bench.run.registry import PluginInfo, Registry, registry


@dataclass(frozen=True)
class FirstParams:
    source: str = param("shapes", "dataset plugin the images come from")
    source_params: dict[str, Any] = param({}, "params of the source dataset")
    count: int = param(4, "how many of the source's images", ge=1)


class FirstImages(Dataset):
    """The first `count` images of another dataset: the smallest dataset built from one."""

    kind = "dataset"
    name = "first_images"
    Params = FirstParams

    @classmethod
    def wrapped_setting(cls, key: str) -> str:
        return "source" if key == "name" else f"source_params.{key}"


@pytest.fixture
def with_first_images(monkeypatch) -> Registry:
    reg = Registry(
        [*registry().infos, PluginInfo("dataset", "first_images", "tests", "0", FirstImages)]
    )
    monkeypatch.setattr(ocl_bench.run.boards, "registry", lambda: reg)
    monkeypatch.setattr(ocl_bench.run.config, "registry", lambda: reg)
    return reg


ROW = Row("first three", {"dataset.name": "first_images", "dataset.count": 3}, {})


def test_a_row_on_a_wrapping_dataset_takes_the_column_dataset_as_its_source(
    with_first_images,
) -> None:
    for column in ("coco", "voc"):
        raw = row_raw(ROW, {}, column)
        assert raw["dataset"] == {"name": "first_images", "count": 3, "source": column}
    # a row on the column's own dataset is unchanged by the column being applied again
    plain = row_raw(Row("plain", {"grouping.num_slots": 5}, {}), {}, "voc")
    assert plain["dataset"]["name"] == "voc" and plain["grouping"]["num_slots"] == 5


def test_command_line_dataset_settings_reach_the_wrapped_dataset(with_first_images) -> None:
    skipped: list[str] = []
    over = [
        "dataset.name=shapes",
        "dataset.image_size=32",
        "dataset.count=2",
        "dataset.min_objects=1",
    ]
    raw = row_raw(ROW, {}, "coco", over, skipped)
    assert raw["dataset"] == {
        "name": "first_images",
        "count": 2,  # its own param stays its own
        "source": "shapes",
        "source_params": {"image_size": 32, "min_objects": 1},  # shapes' params, passed on
    }
    assert skipped == []
    cfg = resolve(raw)
    assert (
        cfg.dataset.name == "first_images" and cfg.dataset.params.source_params["image_size"] == 32
    )
    # a key no dataset plugin has is left alone, so the typo fails as everywhere else
    typo = row_raw(ROW, {}, "coco", ["dataset.imagesize=32"])
    with pytest.raises(ConfigError, match="imagesize"):
        resolve(typo)


def test_a_board_grid_of_a_wrapping_dataset_labels_its_cells(with_first_images, tmp_path) -> None:
    board = tmp_path / "first-images.toml"
    board.write_text(
        'name = "first-images"\ntitle = "t"\ndataset = "mixed"\nbase = {}\n'
        '[[columns]]\nkey = "a"\ntask = "object_discovery"\ndataset = "coco"\n'
        '[[columns]]\nkey = "b"\ntask = "object_discovery"\ndataset = "voc"\n'
        '[[rows]]\nlabel = "first three"\n'
        'overrides = { "dataset.name" = "first_images", "dataset.count" = 3 }\npublished = {}\n'
    )
    grid = load_grid(board, ["dataset.name=shapes", "dataset.image_size=32"])
    # on shapes both columns are one config: one cell, built from shapes at 32 px
    (cell,) = grid.cells
    assert cell.label == "first three [coco as first_images]"
    params = cell.config.dataset.params
    assert dataclasses.asdict(params) == {
        "source": "shapes",
        "source_params": {"image_size": 32},
        "count": 3,
    }
