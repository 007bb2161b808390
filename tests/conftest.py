"""Shared fixtures: a tiny run config that trains in seconds on a CPU."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

TINY = [
    "dataset.image_size=32",
    "dataset.train_size=256",
    "dataset.val_size=32",
    "encoder.channels=16",
    "encoder.patch_size=4",
    "encoder.dim=32",
    "grouping.num_slots=4",
    "grouping.slot_dim=32",
    "grouping.mlp_hidden=64",
    "decoder.hidden=32",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.checkpoint_every=3",
    "train.threads=1",
    "eval.num_images=16",
    "eval.batch_size=8",
    "eval.figure_images=2",
    "tasks.property_prediction.train_images=32",
    "tasks.property_prediction.steps=20",
]


# The smallest default-config model (no training settings): composition and decoder tests.
TINY_MODEL = [
    "dataset.image_size=32",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "encoder.dim=16",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=16",
]


def write_old_store(path: Path, schema: str) -> None:
    """A results database made with an older `schema`, holding one complete cell 'old'
    with FG-ARI 0.25: what migration tests open with today's ResultStore."""
    with sqlite3.connect(path) as conn:
        conn.executescript(schema)
        conn.execute(
            "INSERT INTO cells (id, config_hash, config, plugins, dataset, split, seed, status)"
            " VALUES (1, 'old', '{}', '{}', 'shapes', 'val', 0, 'complete')"
        )
        conn.execute(
            "INSERT INTO metrics (cell_id, task, metric, masks, value, resolution, num_images)"
            " VALUES (1, 'object_discovery', 'fg_ari', 'decoder', 0.25, '[32, 32]', 16)"
        )


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
