"""Slot libraries: mini-batch k-means centroids of a trained run's slots (thesis stage 3).

`ocl-bench slot-library RUN_DIR --centroids K` runs the run's model over a split (the
training split by default), collects every slot the decoder is conditioned on
(`Slots.slots`), and clusters them with mini-batch k-means (Sculley's algorithm, the
thesis' section 3.5.1) in batches of 1024 slots, as the thesis did (section 5.4). The
centroids are saved in the run directory as `slot_library/k<K>.safetensors`, with their
provenance (run config hash, checkpoint step, split, K, seed, slot and image counts,
k-means settings, mean squared distance) as the file's metadata, so a library can be
traced to the weights and data that made it.

Slots are extracted and clustered on the run's device (`--device`: a GPU when there is
one). The centres start from scikit-learn's k-means++ (`kmeans_plusplus`); the batch
updates are a few lines of torch, because scikit-learn's MiniBatchKMeans has no GPU path
and its partial_fit (the only way to report progress) labels each batch twice.

The thesis' uses of a library: replace each slot by its nearest centroid and decode
(generation from centroids, `conditional_generation`'s `slot_library` param), and
masked-slot training (`objectives/masked_slots.py`).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.runtime import resolve_device, seed_everything, untouched_rng
from ocl_bench.api.tasking import ordered_loader
from ocl_bench.run.data import make_dataset
from ocl_bench.run.evaluate import load_run

LIBRARY_DIR = "slot_library"
INITS = ("k-means++", "random")


@dataclass
class SlotLibrary:
    """Centroids float[C, D] and the provenance they were made with."""

    centroids: Tensor
    provenance: dict[str, Any]
    path: Path | None = None

    @property
    def size(self) -> int:
        return int(self.centroids.shape[0])

    def nearest(self, slots: Tensor) -> Tensor:
        """long[...] id of the nearest centroid (Euclidean) of each slot float[..., D]."""
        return nearest_centroids(slots, self.centroids)


def nearest_centroids(slots: Tensor, centroids: Tensor) -> Tensor:
    """Id of the centroid nearest (Euclidean) to each vector of slots float[..., D]."""
    if slots.shape[-1] != centroids.shape[-1]:
        raise DataError(
            f"slots have dimension {slots.shape[-1]} but the library's centroids "
            f"{centroids.shape[-1]}; the library was made from another model"
        )
    flat = slots.reshape(-1, slots.shape[-1]).float()
    ids = torch.cdist(flat, centroids.to(flat.device, torch.float32)).argmin(dim=-1)
    return ids.reshape(slots.shape[:-1])


def library_file(run_dir: Path, centroids: int) -> Path:
    return Path(run_dir) / LIBRARY_DIR / f"k{centroids}.safetensors"


def collect_slots(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    device: torch.device,
    max_images: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """(float32[S, D] every slot of the first `max_images` images (0 = all), image count)."""

    chunks: list[np.ndarray] = []
    images = 0
    model = model.to(device).eval()
    loader = ordered_loader(dataset, max_images, batch_size)
    with torch.no_grad():
        for batch in tqdm(loader, desc="slots", disable=not progress, leave=False):
            out = model(batch.to(device))
            slots = getattr(out, "slots", None)
            vectors = getattr(slots, "slots", None)
            if not isinstance(vectors, Tensor) or vectors.ndim != 3:
                raise DataError("the run's model gives no slots [B, K, D]; nothing to cluster")
            chunks.append(vectors.float().reshape(-1, vectors.shape[-1]).cpu().numpy())
            images += int(vectors.shape[0])
    if not chunks:
        raise DataError("the split holds no images; no slots to cluster")
    return np.concatenate(chunks), images


def fit_centroids(
    slots: np.ndarray,
    centroids: int,
    batch_size: int = 1024,
    epochs: int = 3,
    seed: int = 0,
    init: str = "k-means++",
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mini-batch k-means (Sculley 2010) of slots float[S, D] into `centroids` clusters.

    Centres start from scikit-learn's `kmeans_plusplus` (or random slots) on a random
    sample of max(3 * centroids, batch_size) slots, as MiniBatchKMeans initialises; then
    `epochs` shuffled passes of `batch_size`-slot batches move each centre to the running
    mean of every slot ever assigned to it (per-centre rate 1 / count: the thesis'
    eta, scikit-learn's update). The batches run in torch on `device` (a GPU when given).
    Returns (centroids float32[C, D], settings)."""
    if init not in INITS:
        raise ConfigError(f"unknown k-means init '{init}'; use one of {', '.join(INITS)}")
    count = len(slots)
    if count < centroids:
        raise DataError(f"{count} slots cannot make {centroids} centroids; use fewer centroids")
    # one generator for the initial sample and every epoch's shuffle, drawn in that order
    rng = np.random.default_rng(seed)
    start, sampled = _initial_centres(slots, centroids, batch_size, seed, init, rng)
    device = torch.device(device)
    centres = torch.as_tensor(np.ascontiguousarray(start), dtype=torch.float32, device=device)
    _mini_batch_passes(slots, centres, rng, batch_size, epochs, progress)
    ids, spread = _assign(slots, centres)
    settings = {
        "algorithm": "mini-batch k-means (torch; init sklearn.cluster.kmeans_plusplus)",
        "batch_size": batch_size,
        "epochs": epochs,
        "init": init,
        "init_sample": sampled,
        "mean_squared_distance": spread,
        "used_centroids": int(torch.unique(ids).numel()),
    }
    return centres.cpu().numpy(), settings


def _initial_centres(
    slots: np.ndarray,
    centroids: int,
    batch_size: int,
    seed: int,
    init: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """The starting centres, chosen on a random sample of slots; and that sample's size."""
    from sklearn.cluster import kmeans_plusplus

    count = len(slots)
    sample = slots[
        rng.choice(count, size=min(count, max(3 * centroids, batch_size)), replace=False)
    ]
    if init == "k-means++":
        start, _ = kmeans_plusplus(sample, centroids, random_state=seed)
    else:
        start = sample[rng.choice(len(sample), size=centroids, replace=False)]
    return start, int(len(sample))


def _mini_batch_passes(
    slots: np.ndarray,
    centres: Tensor,
    rng: np.random.Generator,
    batch_size: int,
    epochs: int,
    progress: bool,
) -> None:
    """`epochs` shuffled passes moving `centres` (in place) to the running means."""
    count, centroids = len(slots), len(centres)
    counts = torch.zeros(centroids, dtype=torch.float32, device=centres.device)
    steps = epochs * -(-count // batch_size)
    with tqdm(total=steps, desc="k-means", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = rng.permutation(count)
            for first in range(0, count, batch_size):
                x = torch.from_numpy(slots[order[first : first + batch_size]]).to(centres.device)
                ids = nearest_centroids(x, centres)
                hits = torch.bincount(ids, minlength=centroids).float()
                sums = torch.zeros_like(centres).index_add_(0, ids, x)
                counts += hits
                seen = hits > 0
                # running mean: c += (sum_x - n_b c) / n_total, i.e. rate 1 / count per slot
                step = (sums[seen] - hits[seen, None] * centres[seen]) / counts[seen, None]
                centres[seen] += step
                bar.update(1)


def _assign(slots: np.ndarray, centres: Tensor) -> tuple[Tensor, float]:
    """Each slot's nearest centre and the mean squared distance to it."""
    labels, squared = [], 0.0
    for first in range(0, len(slots), 8192):
        x = torch.from_numpy(slots[first : first + 8192]).to(centres.device)
        ids = nearest_centroids(x, centres)
        labels.append(ids)
        squared += float((x - centres[ids]).pow(2).sum())
    return torch.cat(labels), squared / len(slots)


def build_library(
    run_dir: str | Path,
    centroids: int,
    batch_size: int = 1024,
    epochs: int = 3,
    split: str = "train",
    seed: int = 0,
    init: str = "k-means++",
    max_images: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> SlotLibrary:
    """Cluster a run's slots over `split` and save the library in the run directory.

    The caller's random streams are left as they were: a run that builds its library on
    the way (the masked_slots objective) then initialises exactly as one that finds it
    made."""
    if centroids < 1 or batch_size < 1 or epochs < 1 or max_images < 0:
        raise ConfigError(
            "slot-library: --centroids, --batch and --epochs must be positive, --max-images >= 0"
        )
    run_dir = Path(run_dir)
    cfg, model, step = load_run(run_dir)
    torch_device = resolve_device(device or cfg.train.device)
    try:
        dataset = make_dataset(cfg.dataset, split)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"slot-library: split '{split}' of {cfg.dataset.name}: {err}") from None
    devices = [torch_device] if torch_device.type == "cuda" else []
    with untouched_rng(devices):
        seed_everything(seed)  # slot attention's initial noise, when it samples
        slots, images = collect_slots(
            model, dataset, cfg.eval.batch_size, torch_device, max_images, progress
        )
        centres, settings = fit_centroids(
            slots, centroids, batch_size, epochs, seed, init, progress, torch_device
        )
    provenance = {
        "run_dir": str(run_dir.resolve()),
        "config_hash": cfg.digest(),
        "step": step,
        "dataset": cfg.dataset.name,
        "split": split,
        "images": images,
        "slots": int(len(slots)),
        "slot_dim": int(slots.shape[1]),
        "centroids": centroids,
        "seed": seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **settings,
    }
    path = _save_library(library_file(run_dir, centroids), centres, provenance)
    return SlotLibrary(torch.from_numpy(centres), provenance, path)


def _save_library(path: Path, centres: np.ndarray, provenance: dict[str, Any]) -> Path:
    """Write the centroids with their provenance to `path`, whole or not at all."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"centroids": torch.from_numpy(centres)},
        str(tmp),
        metadata={"provenance": json.dumps(provenance)},
    )
    tmp.replace(path)
    return path


def load_library(where: str | Path, centroids: int | None = None) -> SlotLibrary:
    """A library from its file, or from a run directory (its only library, or k<centroids>)."""
    from safetensors import SafetensorError, safe_open

    path = Path(where)
    if path.is_dir():
        found = sorted((path / LIBRARY_DIR).glob("k*.safetensors"))
        if centroids is not None:
            found = [f for f in found if f == library_file(path, centroids)]
        if len(found) != 1:
            have = ", ".join(f.stem for f in sorted((path / LIBRARY_DIR).glob("k*.safetensors")))
            raise DataError(
                f"no single slot library in {path / LIBRARY_DIR} (found: {have or 'none'}); "
                f"make one with `ocl-bench slot-library {path} --centroids K` or name its file"
            )
        path = found[0]
    if not path.is_file():
        raise DataError(f"slot library not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            centres = f.get_tensor("centroids")
            provenance = json.loads((f.metadata() or {}).get("provenance", "{}"))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a slot library: {err}") from None
    if centres.ndim != 2:
        raise DataError(f"{path}: centroids have shape {tuple(centres.shape)}, expected [C, D]")
    return SlotLibrary(centres.float(), provenance, path)


__all__ = [
    "SlotLibrary",
    "build_library",
    "collect_slots",
    "fit_centroids",
    "library_file",
    "load_library",
    "nearest_centroids",
]
