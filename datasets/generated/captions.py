"""Where the prompts of a generated dataset come from (part of the `generated` dataset).

A caption source is a choice of the generated-dataset recipe (`captions = ...`), not a
plugin kind: there are three, all reading a real dataset's samples, and each yields a
:class:`Prompt` (the text Stable Diffusion generates from, and the class words whose
attention becomes the pseudo mask):

- ``dataset``: the dataset's own captions (shapes has them; COCO captions files are not
  read); the class words are the dataset's class names that occur in the caption;
- ``class_names``: the ground-truth class names of the objects in the image, no caption
  (GLASS's dagger variant, "ground-truth class labels instead of the generated caption");
- ``blip2``: a BLIP-2 caption of the image through transformers (GLASS), class words as for
  ``dataset``. Weights come from a local folder only (`blip2` path, $OCL_BENCH_BLIP2, the
  Hugging Face cache of Salesforce/blip2-opt-2.7b read offline); captions are cached on disk
  per image content and model, so a second build never runs BLIP-2 again.

GLASS picks the class words with a part-of-speech tagger and keeps the nouns that are class
labels; here a class name (possibly several words, e.g. "traffic light") counts when it
appears as whole words in the caption, which is the same set for captions that name the
classes and needs no tagger model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ocl_bench.api.errors import DataError
from ocl_bench.run.feature_cache import default_root, sample_id

CAPTION_SOURCES = ("dataset", "class_names", "blip2")
BLIP2_ENV = "OCL_BENCH_BLIP2"
BLIP2_MODEL_ID = "Salesforce/blip2-opt-2.7b"


@dataclass(frozen=True)
class Prompt:
    caption: str  # "" for class names alone
    classes: tuple[str, ...] = field(default_factory=tuple)  # words whose attention is masked

    @property
    def text(self) -> str:
        """What the image is generated from: Dataset Diffusion's "caption; class, class"."""
        names = ", ".join(self.classes)
        if not self.caption:
            return names
        return f"{self.caption}; {names}" if names else self.caption


def class_vocabulary(dataset: Any) -> dict[int, str]:
    """label -> class name of a dataset plugin (tuples and dicts of names both work)."""
    names = getattr(dataset, "class_names", None)
    if names is None:
        raise DataError(
            f"dataset '{getattr(dataset, 'name', '?')}' names no classes; the class words of "
            "a generated dataset come from its class_names"
        )
    return dict(names) if isinstance(names, dict) else dict(enumerate(names))


def classes_in(caption: str, names: Sequence[str]) -> tuple[str, ...]:
    """The class names found as whole words in the caption, in order of first appearance
    (longer names first, so "traffic light" wins over "light")."""
    text = caption.lower()
    found: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    for name in sorted(set(names), key=len, reverse=True):
        for m in re.finditer(rf"\b{re.escape(name.lower())}s?\b", text):
            if any(a < m.end() and m.start() < b for a, b in taken):
                continue
            taken.append((m.start(), m.end()))
            found.append((m.start(), name))
            break
    return tuple(name for _, name in sorted(found))


def ground_truth_classes(sample: dict[str, Any], vocabulary: dict[int, str]) -> tuple[str, ...]:
    """The distinct class names of a sample's objects, in the order they first appear."""
    labels = sample.get("labels")
    if labels is None:
        raise DataError("captions='class_names' needs a dataset with object labels")
    out: list[str] = []
    for label in labels.tolist():
        name = vocabulary.get(int(label))
        if name is not None and name not in out:
            out.append(name)
    return tuple(out)


def find_blip2(path: str = "", model_id: str = BLIP2_MODEL_ID) -> Path:
    """The local BLIP-2 folder (transformers layout), or a one-line DataError."""
    for where, value in (("blip2", path), (f"${BLIP2_ENV}", os.environ.get(BLIP2_ENV))):
        if value:
            folder = Path(value).expanduser()
            if not (folder / "config.json").is_file():
                raise DataError(
                    f"{where}={folder} is not a transformers BLIP-2 folder (no config.json)"
                )
            return folder
    try:
        from huggingface_hub import snapshot_download

        from ocl_bench.api.weights import hf_hub_cache_dir

        cached = Path(
            snapshot_download(model_id, local_files_only=True, cache_dir=str(hf_hub_cache_dir()))
        )
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # not in the cache (LocalEntryNotFoundError) or hub missing
        pass
    raise DataError(
        f"captions='blip2' needs BLIP-2 weights: set --blip2 PATH or ${BLIP2_ENV}=PATH (a "
        f"transformers folder with config.json), or put {model_id} in the Hugging Face cache"
    )


class Blip2Captioner:
    """BLIP-2 captions through transformers, cached on disk by image content and model."""

    def __init__(self, folder: Path, device: str = "cpu", cache_root: Path | None = None):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.processor = Blip2Processor.from_pretrained(folder, local_files_only=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        self.model.to(device).eval()
        self.device = device
        tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        self.cache = CaptionCache((cache_root or default_root()) / "captions" / f"blip2-{tag}")

    def __call__(self, image: Tensor) -> str:
        key = sample_id(image)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        import torch

        inputs = self.processor(images=image.clamp(0, 1), return_tensors="pt", do_rescale=False)
        with torch.no_grad():
            ids = self.model.generate(**inputs.to(self.device), max_new_tokens=30)
        caption = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        self.cache.put(key, caption)
        return caption


class CaptionCache:
    """One small JSON file per caption, written atomically."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: str) -> str | None:
        path = self.root / f"{key}.json"
        return json.loads(path.read_text())["caption"] if path.is_file() else None

    def put(self, key: str, caption: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp"
        tmp.write_text(json.dumps({"caption": caption}))
        tmp.replace(self.root / f"{key}.json")


class PromptSource:
    """Prompt of sample i of a real dataset, for one caption source."""

    def __init__(self, source: str, dataset: Any, *, blip2: str = "", device: str = "cpu"):
        if source not in CAPTION_SOURCES:
            allowed = ", ".join(repr(s) for s in CAPTION_SOURCES)
            raise DataError(f"unknown caption source {source!r}; expected one of {allowed}")
        self.source = source
        self.dataset = dataset
        self.vocabulary = class_vocabulary(dataset)
        self.captioner = Blip2Captioner(find_blip2(blip2), device) if source == "blip2" else None

    def __call__(self, index: int) -> Prompt:
        sample = self.dataset[index]
        names = list(self.vocabulary.values())
        if self.source == "class_names":
            return Prompt("", ground_truth_classes(sample, self.vocabulary))
        if self.source == "dataset":
            caption = sample.get("caption")
            if caption is None:
                raise DataError(
                    f"dataset '{getattr(self.dataset, 'name', '?')}' has no captions; use "
                    "captions='class_names' or 'blip2'"
                )
        else:
            assert self.captioner is not None
            caption = self.captioner(sample["image"])
        return Prompt(str(caption), classes_in(str(caption), names))


__all__ = [
    "BLIP2_ENV",
    "CAPTION_SOURCES",
    "Blip2Captioner",
    "Prompt",
    "PromptSource",
    "class_vocabulary",
    "classes_in",
    "find_blip2",
    "ground_truth_classes",
]
