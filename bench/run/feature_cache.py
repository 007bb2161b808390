"""On-disk cache of frozen-encoder features, keyed so that any change invalidates it.

A cache key is a hash of everything that determines the features (encoder name, a hash
of the weights that actually run, block, final norm, input size, preprocessing, library
versions, device type, autocast dtype); see `FeatureCache.key`. Inside a key, entries are
addressed by a sample id. Encoders use `sample_id(image)`: the sha1 of the image tensor's
bytes (with its dtype and shape), computed on the images the encoder receives. That is
exact (a different crop, flip or resize is a different id), needs neither the split nor
the dataset index (a Batch carries neither the split nor the dataset's params), and
lets two datasets that yield the same image share one entry.

Layout on disk (root = $OCL_BENCH_CACHE or ~/.cache/ocl-bench/features):

    <root>/<key>/key.json             what the key stands for (written with the first shard)
    <root>/<key>/<sha1>.safetensors   a shard: tensor "features"[n, ...] and, in its
                                      metadata, the JSON list of the n sample ids of its rows

Every file is written under a temporary name and renamed into place, so a reader never
sees a partial shard and concurrent writers (DDP ranks, grid cells) cannot corrupt one.
A shard that cannot be read (for example truncated by a power cut) counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

ENV_ROOT = "OCL_BENCH_CACHE"
FORMAT = "1"
TENSOR = "features"


def default_root() -> Path:
    """$OCL_BENCH_CACHE, or ~/.cache/ocl-bench/features."""
    env = os.environ.get(ENV_ROOT)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ocl-bench" / "features"


def _bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_id(image: Tensor) -> str:
    """sha1 of one sample's tensor: dtype, shape and bytes. Exact and split-independent."""
    h = hashlib.sha1(f"{image.dtype}|{tuple(image.shape)}|".encode())
    h.update(_bytes(image))
    return h.hexdigest()


def sample_ids(images: Tensor) -> list[str]:
    """`sample_id` of every image of a batch [B, ...] (one device-to-host copy)."""
    host = images.detach().cpu()
    return [sample_id(img) for img in host]


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class FeatureCache:
    """Features per (key, sample id), stored as safetensors shards under `root`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._parts: dict[str, dict[str, Any]] = {}
        self._index: dict[str, dict[str, tuple[Path, int]]] = {}
        self._scanned: dict[str, set[str]] = {}

    # keys -------------------------------------------------------------------------------
    def key(self, **parts: Any) -> str:
        """A hex digest of `parts` (JSON-serialisable values); any change gives a new key."""
        text = json.dumps(parts, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        self._parts[digest] = parts
        return digest

    def directory(self, key: str) -> Path:
        return self.root / key

    # reading ----------------------------------------------------------------------------
    def _refresh(self, key: str) -> dict[str, tuple[Path, int]]:
        index = self._index.setdefault(key, {})
        scanned = self._scanned.setdefault(key, set())
        folder = self.directory(key)
        if not folder.is_dir():
            return index
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = entry.name
            if name.startswith(".") or not name.endswith(".safetensors") or name in scanned:
                continue
            try:
                with safe_open(entry.path, framework="pt") as f:
                    ids = json.loads((f.metadata() or {})["ids"])
            except (SafetensorError, OSError, ValueError, KeyError):
                continue  # unreadable: a miss; a later put rewrites it
            scanned.add(name)
            for row, sid in enumerate(ids):
                index.setdefault(sid, (Path(entry.path), row))
        return index

    def lookup(self, key: str, ids: Sequence[str | int]) -> dict[str, Tensor]:
        """The cached rows among `ids` (as strings -> CPU tensors); absent ids are misses."""
        wanted = [str(i) for i in ids]
        index = self._index.get(key, {})
        if any(i not in index for i in wanted):
            index = self._refresh(key)
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for sid in dict.fromkeys(wanted):
            if sid in index:
                shard, row = index[sid]
                by_shard.setdefault(shard, []).append((sid, row))
        out: dict[str, Tensor] = {}
        for shard, rows in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    data = f.get_slice(TENSOR)
                    for sid, row in rows:
                        out[sid] = data[row : row + 1][0]
            except (SafetensorError, OSError, ValueError):
                for sid, _ in rows:  # vanished or unreadable: forget it, it is a miss
                    index.pop(sid, None)
        return out

    def get(self, key: str, ids: Sequence[str | int]) -> Tensor | None:
        """The stacked rows for `ids`, in order, or None unless every one is cached."""
        found = self.lookup(key, ids)
        if any(str(i) not in found for i in ids):
            return None
        return torch.stack([found[str(i)] for i in ids])

    # writing ----------------------------------------------------------------------------
    def put(self, key: str, ids: Sequence[str | int], tensor: Tensor) -> Path | None:
        """Store row i of `tensor` under ids[i] (ids already cached are skipped).

        Returns the shard written, or None when there was nothing new.
        """
        ids = [str(i) for i in ids]
        if tensor.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for a tensor of {tensor.shape[0]} rows")
        index = self._index.get(key, {})
        rows: dict[str, int] = {}
        for row, sid in enumerate(ids):
            if sid not in index and sid not in rows:
                rows[sid] = row
        if not rows:
            return None
        keep = list(rows)
        data = tensor.detach()[list(rows.values())].cpu().contiguous()
        folder = self.directory(key)
        folder.mkdir(parents=True, exist_ok=True)
        described = folder / "key.json"
        if not described.exists() and key in self._parts:
            text = json.dumps(self._parts[key], indent=2, sort_keys=True, default=str)
            _write_atomic(described, lambda p: p.write_text(text + "\n"))
        name = hashlib.sha1("\n".join(keep).encode()).hexdigest()[:24] + ".safetensors"
        shard = folder / name
        meta = {"ids": json.dumps(keep), "format": FORMAT}
        _write_atomic(shard, lambda p: save_file({TENSOR: data}, str(p), metadata=meta))
        self._scanned.setdefault(key, set()).add(name)
        index = self._index.setdefault(key, index)
        for row, sid in enumerate(keep):
            index[sid] = (shard, row)
        return shard


__all__ = ["FeatureCache", "default_root", "sample_id", "sample_ids"]
