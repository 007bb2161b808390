"""Loading pretrained weights from local files: safe formats, strict key reports.

Nothing here touches the network. A weights file is either safetensors or a torch
pickle read with `weights_only=True` (no code is unpickled).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ocl_bench.api.errors import DataError

# Containers that training scripts wrap a state dict in, most specific first. DINO's full
# checkpoints hold {"student", "teacher", ...}; the teacher is the released backbone.
CONTAINER_KEYS = ("teacher", "state_dict", "model", "module")
# Key prefixes that wrappers add (EMA teacher, DistributedDataParallel, backbone + head).
WRAPPER_PREFIXES = ("teacher.", "module.", "backbone.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file or a weights-only torch file (.pth/.pt/.bin)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"weights file {path} is corrupt: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad or unsafe pickles
        reason = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise DataError(
            f"weights file {path} cannot be read with weights_only=True: {' '.join(reason.split())}"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    for _ in range(4):  # nested containers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise DataError(
        f"weights file {path} holds no state dict (a mapping of names to tensors, possibly "
        f"under one of {', '.join(repr(k) for k in CONTAINER_KEYS)})"
    )


def strip_wrappers(
    state: Mapping[str, Tensor], prefixes: Iterable[str] = WRAPPER_PREFIXES
) -> tuple[dict[str, Tensor], list[str]]:
    """Strip each wrapper prefix that occurs, in order; returns (state, dropped keys).

    When some keys carry a prefix, only those keys are kept: "backbone." separates a
    backbone from its projection head (DINO), "teacher." the teacher from the student.
    """
    out = dict(state)
    dropped: list[str] = []
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in out):
            dropped += [k for k in out if not k.startswith(prefix)]
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out, dropped


def strict_load(
    module: nn.Module, state: Mapping[str, Tensor], source: str, note: str = ""
) -> None:
    """Load `state` into `module`, or raise DataError listing every mismatch.

    Reports missing keys, unexpected keys and shape mismatches together, so a user sees
    at once whether a prefix, an architecture or a resolution is wrong.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"missing keys ({len(missing)}): {_clip(missing)}",
            f"unexpected keys ({len(unexpected)}): {_clip(unexpected)}",
        ]
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_clip(shapes)}")
        raise DataError(f"weights {source} do not match the model: {'; '.join(parts)}{note}")
    module.load_state_dict(dict(state), strict=True)


def _clip(items: list[str], n: int = 12) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (real path, size, mtime) in this process."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def cached_hf_file(repo_id: str, filenames: Iterable[str]) -> Path | None:
    """A file of a Hugging Face repo already in the local cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_hub_cache_dir()))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def torch_hub_checkpoint(filename: str) -> Path:
    """Where torch.hub (and older timm) keeps a downloaded checkpoint file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename
