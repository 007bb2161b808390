"""Shared fixtures: a tiny run config that trains in seconds on a CPU."""

from __future__ import annotations

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


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
