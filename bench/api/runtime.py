"""Device, precision and seeding: the settings that decide where and how a run computes."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ocl_bench.api.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use 'cpu'")
    return torch.device(name)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass; fp32 runs plain."""
    if precision == "fp32":
        yield
        return
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


def autocast_dtype(device: torch.device) -> str | None:
    """The dtype autocast computes in on `device` now ("torch.bfloat16"), or None when it is
    off there: feature caches key on it, since features computed under bf16 differ from
    fp32 ones."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4: one query for every device type
        if torch.is_autocast_enabled(device.type):
            return str(torch.get_autocast_dtype(device.type))
        return None
    # torch 2.2/2.3: a query per device type; is_autocast_enabled() without argument is CUDA's
    if device.type == "cpu" and torch.is_autocast_cpu_enabled():
        return str(torch.get_autocast_cpu_dtype())
    if device.type == "cuda" and torch.is_autocast_enabled():
        return str(torch.get_autocast_gpu_dtype())
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def untouched_rng(devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Run a block that seeds or draws from the global generators (python, numpy, torch CPU
    and the CUDA `devices`) and give the caller's streams back as they were: building a
    teacher, a slot library or a validation score must not shift the run's own draws."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
