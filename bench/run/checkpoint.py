"""Crash-safe checkpoints: safetensors weights + a weights-only torch file of the rest.

A checkpoint is a directory written completely under a temporary name and swapped in
with renames, so a kill at any moment leaves either the old or the new one intact.

Frozen modules (a submodule with parameters, none of them trainable: a pretrained encoder,
a diffusion UNet) may be stored as a sha256 of their parameters instead of a copy, so a
multi-GB frozen network is not duplicated into every run. The hashes sit in the metadata
of model.safetensors ("frozen": {module name: sha256}); on load the freshly built model
supplies those weights and the hash proves they are the ones the run was trained with.
Their buffers (running statistics may still move) are stored as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ocl_bench.api.errors import DataError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
EMA_FILE = "ema.safetensors"
DONE_FILE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def frozen_modules(model: nn.Module) -> list[str]:
    """Names of the outermost submodules whose parameters are all frozen (the root and
    parameterless modules excluded)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(name)
    return found


def parameter_sha256(module: nn.Module) -> str:
    """sha256 over a module's parameters (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, value in sorted(module.named_parameters()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def frozen_hashes(model: nn.Module) -> dict[str, str]:
    """{frozen module name: parameter_sha256}; computed once per run, the weights never move."""
    return {name: parameter_sha256(model.get_submodule(name)) for name in frozen_modules(model)}


def _frozen_keys(model: nn.Module, names: list[str]) -> set[str]:
    """State-dict keys of the parameters of the modules `names` (their buffers excluded)."""
    return {
        f"{name}.{param}"
        for name in names
        for param, _ in model.get_submodule(name).named_parameters()
    }


def model_state(
    model: nn.Module, skip: set[str] | frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """Contiguous, unshared copies (safetensors refuses aliased tensors), without `skip`."""
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if k not in skip
    }


def save(
    directory: Path,
    model: nn.Module,
    state: dict[str, Any],
    *,
    frozen: dict[str, str] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `directory` atomically: build it beside, then rename into place.

    frozen: {module name: hash} (see `frozen_hashes`) of modules stored as their hash
    only; None stores every weight (importers, whose frozen weights come from the file).
    ema: averaged weights, written to EMA_FILE.
    """
    directory = Path(directory)
    new = directory.with_name(directory.name + ".new")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    frozen = frozen or {}
    metadata = {"step": str(state["step"]), "frozen": json.dumps(frozen, sort_keys=True)}
    weights = model_state(model, _frozen_keys(model, list(frozen)))
    save_file(weights, str(new / MODEL_FILE), metadata=metadata)
    torch.save(state, new / STATE_FILE)
    files = [MODEL_FILE, STATE_FILE]
    if ema is not None:
        ema_state = {k: v.detach().cpu().contiguous().clone() for k, v in ema.items()}
        save_file(ema_state, str(new / EMA_FILE), metadata={"step": str(state["step"])})
        files.append(EMA_FILE)
    for name in files:
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


def saved_step(directory: Path) -> int:
    """The step a complete checkpoint directory holds (its DONE_FILE, written last)."""
    done = Path(directory) / DONE_FILE
    try:
        text = done.read_text()
        return int(text.strip())
    except (OSError, UnicodeDecodeError, ValueError):
        raise DataError(
            f"checkpoint marker {done} is damaged: expected the step number `save` writes"
            " last; delete the checkpoint folder to start the run again"
        ) from None


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


def stored_frozen_hashes(path: Path) -> dict[str, str]:
    """The {module: hash} a model file records for the frozen modules it does not hold."""
    try:
        with safe_open(str(path), "pt") as fh:
            text = (fh.metadata() or {}).get("frozen", "{}")
        found = json.loads(text)
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"checkpoint file {path} is corrupt: {err}") from None
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise DataError(f"checkpoint file {path} is corrupt: bad 'frozen' metadata {text!r}")
    return found


def check_frozen(model: nn.Module, recorded: dict[str, str], path: Path) -> None:
    """DataError unless every frozen module of the checkpoint has the recorded weights."""
    for name, expected in sorted(recorded.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise DataError(
                f"checkpoint {path} was trained with a frozen module '{name}' that the model "
                "built from its config does not have"
            ) from None
        actual = parameter_sha256(module)
        if actual != expected:
            raise DataError(
                f"checkpoint {path}: the frozen module '{name}' ({type(module).__name__}) "
                f"is not the one the run was trained with (sha256 {actual[:12]}, recorded "
                f"{expected[:12]}): its pretrained weights changed; give the original weights "
                "or retrain"
            )


def load_into(model: nn.Module, path: Path) -> None:
    """Strict load with a report of missing and unexpected keys; frozen modules stored as
    a hash keep the model's own weights once the hash matches."""
    weights = load_weights(path)
    recorded = stored_frozen_hashes(path)
    check_frozen(model, recorded, path)
    supplied = _frozen_keys(model, list(recorded))
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in supplied]
    if missing or result.unexpected_keys:
        raise DataError(
            f"checkpoint {path} does not match the model: missing keys "
            f"{missing[:10]}, unexpected keys {result.unexpected_keys[:10]}"
        )
