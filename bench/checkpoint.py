"""Crash-safe checkpoints: safetensors weights + a weights-only torch file of the rest.

A checkpoint is a directory written completely under a temporary name and swapped in
with renames, so a kill at any moment leaves either the old or the new one intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ocl_bench.errors import DataError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
DONE_FILE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared copies (safetensors refuses aliased tensors)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save(directory: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Write `directory` atomically: build it beside, then rename into place."""
    directory = Path(directory)
    new = directory.with_name(directory.name + ".new")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file(model_state(model), str(new / MODEL_FILE), metadata={"step": str(state["step"])})
    torch.save(state, new / STATE_FILE)
    for name in (MODEL_FILE, STATE_FILE):
        with open(new / name, "rb") as fh:
            os.fsync(fh.fileno())
    (new / DONE_FILE).write_text(str(state["step"]))
    _fsync_dir(new)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    new.rename(directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(directory: Path) -> Path | None:
    """Repair what a kill between the renames of `save` left; return the usable dir."""
    directory = Path(directory)
    new = directory.with_name(directory.name + ".new")
    old = directory.with_name(directory.name + ".old")
    if (directory / DONE_FILE).exists():
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return directory
    for candidate in (new, old):
        if (candidate / DONE_FILE).exists():
            shutil.rmtree(directory, ignore_errors=True)
            candidate.rename(directory)
            return recover(directory)
    return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"checkpoint file {path} is corrupt: {err}") from None


def load_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad pickles
        # torch's weights-only message spans lines and advises weights_only=False: keep its cause
        reason = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise DataError(f"checkpoint file {path} is corrupt: {' '.join(reason.split())}") from None


def load_into(model: nn.Module, path: Path) -> None:
    """Strict load with a report of missing and unexpected keys."""
    weights = load_weights(path)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"checkpoint {path} does not match the model: missing keys "
            f"{result.missing_keys[:10]}, unexpected keys {result.unexpected_keys[:10]}"
        )
