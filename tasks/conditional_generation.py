"""Conditional generation: images sampled from each image's slots against the real image.

Per-image PSNR and SSIM (torchmetrics, data range [0, 1]) are averaged over the images;
FID (clean-fid's Inception, "clean" resize) compares the generated set with the real
images of the same split. The FID record carries its protocol (images, resolution,
reference set, extractor and weights hash), because FIDs measured under different
protocols are not comparable. Weights are read from a local file only (see
ocl_bench.tasks.fid); reference statistics are cached on disk.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from ocl_bench.api.contracts import GenerativeDecoder, Slots, recombine_slots
from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param, to_dict
from ocl_bench.api.tasking import EvalContext, Metric, MetricRecord, Task, TaskResult
from ocl_bench.tasks import fid as fidlib

if TYPE_CHECKING:  # evaluate imports it on use: it imports the run machinery that loads plugins
    from ocl_bench.run.slot_library import SlotLibrary

FID_MODES = ("required", "if_available", "off")


def peak_signal_noise_ratio(*args: Any, **kwargs: Any) -> Tensor:
    # imported on use: torchmetrics' image package takes seconds to import, and every
    # `ocl-bench` command discovers this plugin
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr

    return psnr(*args, **kwargs)


def structural_similarity_index_measure(*args: Any, **kwargs: Any) -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    return ssim(*args, **kwargs)


SSIM_KERNEL = 11  # torchmetrics' (and Wang et al.'s) Gaussian window, sigma 1.5


@dataclass(frozen=True)
class ConditionalGenerationParams:
    steps: int | None = param(None, "sampling steps (unset = the decoder's default)", ge=1)
    guidance_scale: float | None = param(
        None, "classifier-free guidance scale (unset = the decoder's default)", ge=0
    )
    seed: int = param(0, "seed of the sampling generator and of the slot recombination", ge=0)
    fid: Literal["required", "if_available", "off"] = param(
        "if_available",
        "'required' fails without Inception weights; 'if_available' skips FID with a warning",
    )
    inception_path: str = param(
        "",
        f"{fidlib.INCEPTION_FILE} or its directory (empty: ${fidlib.INCEPTION_ENV}, "
        "then clean-fid's cache)",
    )
    fid_resolution: int = param(
        299, "side images are resized to for Inception (299 = clean-fid's protocol)", ge=75
    )
    fid_cache: str = param(
        "",
        f"directory of cached reference statistics (empty: ${fidlib.CACHE_ENV}, "
        "else ~/.cache/ocl-bench/fid)",
    )
    batch_size: int = param(32, "images per Inception forward", ge=1)
    figure_images: int = param(8, "columns of the generation figure (0 = no figure)", ge=0)
    slot_library: str = param(
        "",
        "a slot library (file, or run directory holding one: `ocl-bench slot-library`): also"
        " generate from each image's slots replaced by their nearest centroids (thesis 5.4),"
        " scored as centroid_psnr / centroid_ssim / centroid_fid with its own figure",
    )


class ConditionalGeneration(Task):
    """Images generated from slots vs the real images: FID, PSNR, SSIM, a figure."""

    metrics = (
        Metric(
            "fid",
            "Frechet Inception distance of generated to real images",
            higher_is_better=False,
            headline=True,
        ),
        Metric("psnr", "PSNR of each generated image to its real one", unit="dB"),
        Metric("ssim", "SSIM of each generated image to its real one"),
        Metric(
            "centroid_fid",
            "fid with slots replaced by their slot-library centroids",
            higher_is_better=False,
        ),
        Metric("centroid_psnr", "psnr with slot-library centroids", unit="dB"),
        Metric("centroid_ssim", "ssim with slot-library centroids"),
    )
    figures = ("figures/conditional_generation.png", "figures/conditional_generation_centroids.png")
    name = "conditional_generation"
    Params = ConditionalGenerationParams
    # The MLP decoder generates; FID off (no Inception weights in tests), 2 figure images.
    conformance = {
        "tasks.conditional_generation.fid": "off",
        "tasks.conditional_generation.steps": 2,
        "tasks.conditional_generation.batch_size": 2,
        "tasks.conditional_generation.figure_images": 2,
    }
    requires = frozenset({"generation.images"})

    def __init__(self, params: ConditionalGenerationParams):
        self.params = params

    def _extractor(
        self, device: torch.device
    ) -> tuple[fidlib.InceptionExtractor | None, str | None]:
        """(extractor, None), or (None, why FID is skipped) under fid='if_available'."""
        if self.params.fid == "off":
            return None, "fid='off'"
        try:
            file = fidlib.find_inception(self.params.inception_path or None)
            return fidlib.load_extractor(file).to(device), None
        except DataError as err:
            if self.params.fid == "required":
                raise
            print(f"warning: conditional_generation: FID skipped: {err}", file=sys.stderr)
            return None, str(err)

    @torch.no_grad()  # ctx.predictions disables grad only inside its own frame
    def evaluate(self, ctx: EvalContext) -> TaskResult:
        p = self.params
        decoder = ctx.model.decoder
        if not isinstance(decoder, GenerativeDecoder):
            raise DataError(f"decoder {type(decoder).__name__} has no generate(); cannot generate")
        extractor, skipped = self._extractor(ctx.device)
        data = ctx.dataset(ctx.split)
        count = len(data) if ctx.num_images <= 0 else min(ctx.num_images, len(data))
        # How the decoder samples (its defaults filled in: solver, steps, guidance, size).
        sampling = decoder.sampling_protocol(p.steps, p.guidance_scale)
        reference = None
        if extractor is not None:
            reference = self._reference(data, ctx.split, count, extractor.sha256, sampling)
        library = None
        if p.slot_library:
            from ocl_bench.run.slot_library import load_library

            library = load_library(p.slot_library)
        own, nearest, size = self._generate_all(ctx, decoder, extractor, reference, library)
        images = own.images
        res = (p.fid_resolution, p.fid_resolution)
        records = self._scores(own, "", size, images, sampling or None)
        info: dict[str, Any] = {"images": images}
        fid_protocol: dict[str, Any] = {}
        if reference is not None:
            fid_protocol = self._fid_protocol(reference, images, sampling)
            value = reference.fid(own.features, images)
            records.append(_record(self.name, "fid", value, res, images, fid_protocol))
            info["fid_reference_cached"] = reference.cached
            info["fid_reference_file"] = str(reference.cache.path(reference.key))
        else:
            info["fid_skipped"] = skipped
        if library is not None:
            # Same images, seed and reference as above; only the slots differ.
            centroid_protocol = {**sampling, "slot_library": library.provenance}
            records += self._scores(nearest, "centroid_", size or (0, 0), images, centroid_protocol)
            if reference is not None and images >= 2 and nearest.features:
                value = reference.fid(nearest.features, images)
                fid_protocol = {**fid_protocol, "slot_library": library.provenance}
                records.append(_record(self.name, "centroid_fid", value, res, images, fid_protocol))
            info["slot_library"] = str(library.path)
        return TaskResult(records, info, self._figures(ctx.out_dir, own.rows, nearest.rows))

    def _generate_all(
        self,
        ctx: EvalContext,
        decoder: Any,
        extractor: fidlib.InceptionExtractor | None,
        reference: _Reference | None,
        library: SlotLibrary | None,
    ) -> tuple[_Generated, _Generated, tuple[int, int] | None]:
        """(own, nearest, size): every image generated from its slots and scored against the
        real one, at `size`; with a slot library, generated again from each slot's nearest
        centroid (thesis 5.4) and scored the same way: same images, generator and
        reference, only the slots differ (both draw from the one generator, batch by batch)."""
        p = self.params
        figure = p.figure_images > 0 and ctx.out_dir is not None
        generator = torch.Generator(device=ctx.device).manual_seed(p.seed)
        own, nearest = _Generated(), _Generated()
        size: tuple[int, int] | None = None
        for batch, out in ctx.predictions(desc="conditional generation"):
            fake = self._generate(decoder, out.slots, generator).float()
            real = self._score(own, decoder, fake, batch.images.float(), extractor)
            size = (int(real.shape[-2]), int(real.shape[-1]))
            if extractor is not None and reference is not None and reference.stats is None:
                reference.real_features.append(self._features(extractor, real))
            if own.rows is None and figure:
                own.rows = self._figure_rows(decoder, real, fake, out.slots)
            if library is None:
                continue
            slots = out.slots.slots
            centroids = library.centroids.to(slots)[library.nearest(slots)]
            made = self._generate(decoder, replace(out.slots, slots=centroids), generator).float()
            self._score(nearest, decoder, made, real, extractor)
            if nearest.rows is None and figure:
                n = min(p.figure_images, real.shape[0])
                nearest.rows = {
                    "real": real[:n].cpu(),
                    "from slots": fake[:n].cpu(),
                    "from nearest centroids": made[:n].cpu(),
                }
        return own, nearest, size

    def _score(
        self,
        into: _Generated,
        decoder: Any,
        fake: Tensor,
        real: Tensor,
        extractor: fidlib.InceptionExtractor | None,
    ) -> Tensor:
        """Adds the per-image PSNR and SSIM of generated images against the real ones (and
        their Inception features) to `into`; returns the real images as compared."""
        if fake.shape[:2] == real.shape[:2] and fake.shape[2:] != real.shape[2:]:
            # A decoder generating at its own resolution (StableLSD: 256 px from
            # 448 px inputs) is compared at that resolution, as its papers do.
            real = torch.nn.functional.interpolate(
                real, size=fake.shape[2:], mode="bilinear", antialias=True, align_corners=False
            ).clamp(0, 1)
        if fake.shape != real.shape:
            raise DataError(
                f"decoder {type(decoder).__name__} generated {tuple(fake.shape)} images "
                f"for real images of shape {tuple(real.shape)}"
            )
        into.psnr.append(
            peak_signal_noise_ratio(
                fake, real, data_range=1.0, reduction="none", dim=(1, 2, 3)
            ).cpu()
        )
        into.ssim.append(_ssim(fake, real).cpu())
        if extractor is not None:
            into.features.append(self._features(extractor, fake))
        return real

    def _reference(
        self, data: Any, split: str, count: int, weights_sha256: str, sampling: dict[str, Any]
    ) -> _Reference:
        """The FID reference set, the first `count` real images of `split`: its cache entry,
        with the statistics when they are cached."""
        p = self.params
        cache = fidlib.ReferenceCache(
            Path(p.fid_cache).expanduser() if p.fid_cache else fidlib.default_cache_dir()
        )
        data_params = to_dict(data.params) if hasattr(data, "params") else {}
        if "generated_resolution" in sampling:  # real images are resized to it
            data_params["compared_at"] = sampling["generated_resolution"]
        key = fidlib.reference_key(
            getattr(data, "name", type(data).__name__),
            data_params,
            split,
            p.fid_resolution,
            count,
            weights_sha256,
        )
        description = f"{key['dataset']} {split}, the same {count} images"
        return _Reference(cache, key, cache.load(key), weights_sha256, description)

    def _fid_protocol(
        self, reference: _Reference, images: int, sampling: dict[str, Any]
    ) -> dict[str, Any]:
        p = self.params
        return {
            "package": f"clean-fid {importlib.metadata.version('clean-fid')}",
            "mode": "clean",
            "extractor": fidlib.INCEPTION_FILE,
            "weights_sha256": reference.weights_sha256,
            "images": images,
            "resolution": p.fid_resolution,
            "reference": reference.description,
            "steps": p.steps,
            "guidance_scale": p.guidance_scale,
            "seed": p.seed,
            **sampling,
        }

    def _scores(
        self,
        generated: _Generated,
        prefix: str,
        size: tuple[int, int] | None,
        images: int,
        protocol: dict[str, Any] | None,
    ) -> list[MetricRecord]:
        """The mean PSNR and SSIM records of one set of generated images."""
        return [
            _record(self.name, f"{prefix}{metric}", _mean(chunks), size, images, protocol)
            for metric, chunks in (("psnr", generated.psnr), ("ssim", generated.ssim))
        ]

    def _figures(
        self,
        out_dir: Path | None,
        rows: dict[str, Tensor] | None,
        centroid_rows: dict[str, Tensor] | None,
    ) -> list[str]:
        """The generation figure, then the slot library's one (only beside the first)."""
        if rows is None or out_dir is None:
            return []
        path = Path(out_dir) / "figures" / "conditional_generation.png"
        # imported here: discovering plugins imports every task module, and matplotlib is slow
        from ocl_bench.api.drawing import image_rows_figure

        figures = [str(image_rows_figure(rows, path))]
        if centroid_rows is not None:
            path = path.with_name("conditional_generation_centroids.png")
            figures.append(str(image_rows_figure(centroid_rows, path)))
        return figures

    def _generate(self, decoder: Any, slots: Slots, generator: torch.Generator) -> Tensor:
        p = self.params
        return decoder.generate(
            slots, steps=p.steps, guidance_scale=p.guidance_scale, generator=generator
        )

    def _features(self, extractor: fidlib.InceptionExtractor, images: Tensor) -> np.ndarray:
        return fidlib.extract_features(
            extractor, images, self.params.fid_resolution, self.params.batch_size
        )

    def _figure_rows(
        self, decoder: Any, real: Tensor, fake: Tensor, slots: Slots
    ) -> dict[str, Tensor]:
        n = min(self.params.figure_images, real.shape[0])
        rows = {"real": real[:n].float().cpu(), "generated": fake[:n].float().cpu()}
        if n >= 2:  # recombining one image's slots gives it back
            mix_gen = torch.Generator().manual_seed(self.params.seed + 1)
            mixed = recombine_slots(_first(slots, n), mix_gen)
            sample_gen = torch.Generator(device=real.device).manual_seed(self.params.seed)
            rows["recombined slots"] = self._generate(decoder, mixed, sample_gen).float().cpu()
        return rows


def _first(slots: Slots, n: int) -> Slots:
    """The first n images' slots (every batch-major tensor field sliced)."""
    return replace(
        slots,
        **{
            f.name: getattr(slots, f.name)[:n]
            for f in fields(slots)
            if isinstance(getattr(slots, f.name), Tensor)
        },
    )


def _ssim(fake: Tensor, real: Tensor) -> Tensor:
    """Per-image SSIM; images smaller than the 11-px window use the largest odd one that fits."""
    side = min(real.shape[-2:])
    kernel = min(SSIM_KERNEL, side if side % 2 else side - 1)
    return structural_similarity_index_measure(
        fake, real, data_range=1.0, reduction="none", kernel_size=kernel
    )


def _mean(chunks: list[Tensor]) -> float:
    if not chunks:
        return float("nan")
    return float(torch.cat(chunks).double().mean())


def _record(
    task: str,
    metric: str,
    value: float,
    resolution: tuple[int, int] | None,
    images: int,
    protocol: dict[str, Any] | None,
) -> MetricRecord:
    return MetricRecord(task, metric, value, None, resolution, images, protocol=protocol)


@dataclass
class _Generated:
    """One set of generated images scored against the real ones, batch by batch: per-image
    PSNR and SSIM, Inception features (with an extractor), the figure's rows."""

    psnr: list[Tensor] = field(default_factory=list)
    ssim: list[Tensor] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    rows: dict[str, Tensor] | None = None

    @property
    def images(self) -> int:
        return sum(int(t.numel()) for t in self.psnr)


@dataclass
class _Reference:
    """The FID reference set: its cache entry, its statistics (read from the cache, or
    computed from the real images' features gathered while generating) and its name in
    the FID protocol."""

    cache: fidlib.ReferenceCache
    key: dict[str, Any]
    stats: tuple[np.ndarray, np.ndarray] | None
    weights_sha256: str
    description: str
    real_features: list[np.ndarray] = field(default_factory=list)
    cached: bool = field(init=False)

    def __post_init__(self) -> None:
        self.cached = self.stats is not None

    def fid(self, features: list[np.ndarray], images: int) -> float:
        """FID of the generated images' features to the reference; NaN under two images
        (a covariance needs two). The first call computes and caches missing statistics."""
        if images < 2:
            return float("nan")
        if self.stats is None:
            self.stats = fidlib.statistics(np.concatenate(self.real_features))
            self.cache.save(self.key, *self.stats)
        return fidlib.frechet_distance(*self.stats, np.concatenate(features))


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [ConditionalGeneration]
