"""Stored results keep their meaning: the config hash of every packaged board cell and preset
is pinned (tests/data/config_digests_0.1.json, written before evaluation protocols existed).

A cell whose hash changes no longer finds its stored result, so a change here must be a change
of what the cell measures (its protocol, its recipe), listed in CHANGED with the reason; a new
param declared with `since` keeps every hash (see ocl_bench.api.params.param).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ocl_bench.api.params import hashed_dict, param, to_dict
from ocl_bench.run.boards import list_leaderboards, load_grid
from ocl_bench.run.config import load_config, preset_names

PINNED = json.loads((Path(__file__).parent / "data" / "config_digests_0.1.json").read_text())

# Why cells changed when protocols became named units (issue 18): each now equals its
# official loader, which the settings before did not.
_GLASS = "protocol glass: GLASS's COCO loader (cv2, 256-px masks, later-wins painting)"
_DINOSAUR = "protocol dinosaur: OCLF's float-tensor resize without antialias, nearest-exact masks"
_SD = "protocols slotdiffusion/slate: SlotDiffusion's cv2 loader, masks at the input size"
# the slotdiffusion presets also feed DINO (x - 0.5) / 0.5 as SlotDiffusion's loaders do
_SD_DINO = _SD + "; DINO input normalised with mean = std = 0.5 (encoder.normalize='half')"
_LSD = "protocol stablelsd: GLASS's annotation rules at 256 px"
_VQVAE = "the VQ-VAE stage reads COCO as its SlotDiffusion row does, under protocol slotdiffusion"
_GLASS_ROWS = {
    "GLASS": _GLASS,
    "StableLSD": _GLASS,
    "DINOSAUR": _GLASS,
    "SA": _SD,
    "SLATE": _SD,
    "SlotDiffusion": _SD_DINO,
    "@slotdiffusion-vqvae": _VQVAE,
}
# board -> row label prefixes whose cells were meant to change, and why.
CHANGED: dict[str, dict[str, str]] = {
    **{b: _GLASS_ROWS for b in ("glass-table-2", "glass-table-3", "glass-table-6")},
    **{b: _GLASS_ROWS for b in ("glass-table-4", "glass-table-7", "glass-fig-4b")},
    **{b: _GLASS_ROWS for b in ("glass-fig-4a", "glass-fig-4a-slots")},
    "thesis-table-5-1": {
        "SLATE": _SD,
        "SlotDiffusion": _SD_DINO,
        "@slotdiffusion-vqvae": _VQVAE,
    },
}
CHANGED_PRESETS: dict[str, str] = {
    "glass-coco": _GLASS,
    "glass-voc": _GLASS,
    "dinosaur-mlp-coco": _DINOSAUR,
    "dinosaur-transformer-coco": _DINOSAUR,
    "slate": _SD,
    "slotdiffusion-coco": _SD_DINO,
    "slotdiffusion-voc": _SD_DINO,
    "stablelsd": _LSD,
    "spot-voc": "protocol spot: SPOT's VOC loader counts label 255 as background",
}


def _changed(board: str, label: str) -> bool:
    return any(label.startswith(prefix) for prefix in CHANGED.get(board, {}))


@pytest.mark.parametrize("board", sorted(PINNED["boards"]))
def test_board_cell_hashes_stay_unless_their_protocol_changed(board: str) -> None:
    path = next(p for p in list_leaderboards() if p.stem == board)
    now = {c.label: c.config.digest() for c in load_grid(path).cells}
    before = PINNED["boards"][board]
    kept = {label: d for label, d in before.items() if not _changed(board, label)}
    moved = {label: (d, now.get(label)) for label, d in kept.items() if now.get(label) != d}
    assert not moved, f"{board}: cells whose hash changed without a listed reason: {moved}"
    for label in before:
        if _changed(board, label):
            assert now.get(label) != before[label], f"{board}/{label} is listed as changed"


@pytest.mark.parametrize("name", sorted(PINNED["presets"]))
def test_preset_hashes_stay_unless_their_protocol_changed(name: str) -> None:
    digest = load_config(name).digest()
    if name in CHANGED_PRESETS:
        assert digest != PINNED["presets"][name]
    else:
        assert digest == PINNED["presets"][name]
    assert name in preset_names()


def test_a_param_added_since_a_release_is_hashed_only_away_from_its_default() -> None:
    @dataclasses.dataclass(frozen=True)
    class Old:
        size: int = param(3, "a size")

    @dataclasses.dataclass(frozen=True)
    class New:
        size: int = param(3, "a size")
        mode: str = param("old", "a mode added later", since="0.2")
        sizes: tuple[int, ...] = param((1, 2), "a tuple added later", since="0.2")

    assert hashed_dict(New()) == hashed_dict(Old()) == {"size": 3}
    assert hashed_dict(New(mode="new")) == {"size": 3, "mode": "new"}
    assert hashed_dict(New(sizes=(1,))) == {"size": 3, "sizes": [1]}
    assert to_dict(New())["mode"] == "old"  # the resolved config still records it
