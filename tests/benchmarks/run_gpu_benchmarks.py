"""Each family's training step at its paper size on a GPU: images/s, peak memory, data wait.

    python tests/benchmarks/run_gpu_benchmarks.py --out gpu.json
    python tests/benchmarks/run_gpu_benchmarks.py --compare old.json gpu.json

For every family (FAMILIES: SPOT, DINOSAUR, MAGE stage 2, StableLSD, GLASS, SlotDiffusion,
SLATE) the family's preset is trained for `warmup + steps` optimiser steps by the harness's
own trainer (`ocl_bench.run.train.train`: its data loader, autocast, gradient scaler,
clipping and AdamW), and the figures are read back from the run's train log, where the
trainer's ThroughputMeter writes them per step:

- images_per_s: images of the timed steps over the wall seconds of those steps (the first
  `warmup` steps, with cuDNN autotuning and the allocator's first growth, are left out);
- data_wait: the fraction of those seconds spent fetching the batch and moving it to the
  device;
- peak_memory_bytes: torch.cuda.max_memory_allocated over the whole run (model set-up
  included), reset before each family; null on a CPU.

What is measured is the model step, not an input pipeline. No pretrained weight exists
here, so every network is built at the paper's size with random weights (the speed of a
network does not depend on its weights): encoders with `encoder.random_init=true`, MAGE's
tokenizer with it, SlotDiffusion's VQ-VAE with `decoder.vqvae=random`, and for StableLSD
and GLASS a diffusers folder of Stable Diffusion 2.1's UNet and VAE architectures with
random weights written once to the work directory. The data are the embedded `shapes`
scenes drawn at the paper's resolution, one batch of them kept in memory
(`dataset.cache`), so after the first step the data wait is the collate and the copy to
the device. GLASS trains on generated images with their pseudo masks; here its guidance
loss reads the shapes' ground-truth semantic masks instead (`source=gt_masks`: the same
matching and BCE). The MAGE stage-2 teacher is an untrained thesis-stage1 run at the same
sizes (its forward pass is part of each stage-2 step whatever its weights).

The batch is the per-GPU batch of each paper's recipe (BATCH_NOTE); `--batch N` sets one
for all. Precision (`--precision`): `auto` keeps the fp32 recipes in fp32 and runs the
recipes that train in mixed precision (StableLSD and GLASS fp16, MAGE's AMP) in bf16 where
the GPU has it, else in fp16; `preset` runs each preset's train.precision as written.

`--tiny` shrinks every family to a CPU-sized stand-in (seconds), which
tests/test_gpu_benchmarks.py runs so that this code cannot rot without a GPU; its figures
say nothing about the paper sizes. tests/benchmarks/test_bench_gpu_steps.py runs the same
families under pytest-benchmark (`--benchmark-enable`), the figures in extra_info.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ocl_bench.run.config import load_config, load_raw
from ocl_bench.run.train import train
from ocl_bench.testing import write_untrained_run

SCHEMA = "ocl-bench-gpu-steps/1"
CUDA_SKIP = (
    "needs a CUDA GPU (torch.cuda.is_available() is False): the paper-size steps are timed "
    "on CUDA; tests/test_gpu_benchmarks.py runs the same code tiny on the CPU"
)
WARMUP, STEPS = 3, 10  # untimed and timed optimiser steps per family on a GPU
TINY_WARMUP, TINY_STEPS = 1, 2

# Tiny stand-ins of the frozen ViTs: 2 blocks of width 32 on a 4 x 4 patch grid.
TINY_VIT = ("encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2")
# MAGE's tokenizer, ViT and slots shrunk (tests/benchmarks/test_bench_mage.py uses them too).
TINY_MAGE = (
    *TINY_VIT,
    "encoder.image_size=32",
    "encoder.tokenizer.ch=8",
    "encoder.tokenizer.ch_mult=[1,2]",
    "encoder.tokenizer.n_embed=32",
    "encoder.tokenizer.embed_dim=8",
    "encoder.tokenizer.norm_groups=4",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=16",
)


@dataclass(frozen=True)
class Family:
    """One model family: its preset at paper size and the overrides of the benchmark."""

    name: str
    preset: str
    image_size: int  # the paper's training resolution (what the data loader yields)
    batch: int  # images per step on one GPU in the paper's recipe
    mixed: bool  # whether the recipe trains in mixed precision
    mixed_fallback: str  # its precision on a GPU without bf16
    full: tuple[str, ...]  # random init and benchmark-only settings at paper size
    tiny: tuple[str, ...]  # the CPU stand-in (applied after `full`)
    tiny_image_size: int


LSD_FULL = ("encoder.random_init=true", "decoder.cache_latents=false")
LSD_TINY = (
    *TINY_VIT,
    "encoder.image_size=56",
    "grouping.slot_dim=32",
    "grouping.mlp_hidden=32",
    "decoder.image_size=32",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "spot",
            "spot-coco",
            224,
            64,
            False,
            "fp32",
            ("encoder.random_init=true",),
            (
                *TINY_VIT,
                "encoder.image_size=64",
                "grouping.slot_dim=16",
                "grouping.mlp_hidden=32",
                "decoder.num_layers=1",
                "decoder.num_heads=2",
            ),
            64,
        ),
        Family(
            "dinosaur",
            "dinosaur-mlp-coco",
            224,
            8,
            False,
            "fp32",
            ("encoder.random_init=true",),
            (
                *TINY_VIT,
                "encoder.image_size=64",
                "grouping.slot_dim=16",
                "grouping.mlp_hidden=32",
                "grouping.pre_mlp_out=16",
                "decoder.hidden=32",
            ),
            64,
        ),
        Family(
            "mage",
            "thesis-stage2",
            256,
            32,
            True,
            "fp16",
            ("encoder.random_init=true", "decoder.pretrained=false"),
            (*TINY_MAGE, "decoder.depth=2", "decoder.num_heads=2"),
            32,
        ),
        Family("stablelsd", "stablelsd", 448, 32, True, "fp16", LSD_FULL, LSD_TINY, 56),
        Family(
            "glass",
            "glass-coco",
            448,
            32,
            True,
            "fp16",
            (*LSD_FULL, "objectives.glass_guidance.source=gt_masks"),
            LSD_TINY,
            56,
        ),
        Family(
            "slotdiffusion",
            "slotdiffusion-coco",
            224,
            64,
            False,
            "fp32",
            ("encoder.random_init=true", "decoder.vqvae=random"),
            (
                *TINY_VIT,
                "encoder.image_size=32",
                "grouping.slot_dim=16",
                "grouping.mlp_hidden=32",
                "grouping.pre_mlp_out=16",
                "decoder.tiny=true",
            ),
            32,
        ),
        Family(
            "slate",
            "slate",
            128,
            50,
            False,
            "fp32",
            (),
            (
                "encoder.channels=8",
                "encoder.dim=16",
                "grouping.slot_dim=16",
                "grouping.mlp_hidden=16",
                "decoder.d_model=16",
                "decoder.num_layers=1",
                "decoder.num_heads=2",
                "decoder.vocab_size=32",
                "decoder.tokenizer_channels=8",
            ),
            32,
        ),
    )
}
BATCH_NOTE = {
    "spot": "SPOT: batch 64 on one GPU",
    "dinosaur": "OCLF: 8 GPUs x 8",
    "mage": "thesis: batch 32 on one 24 GB GPU",
    "stablelsd": "LSD: 4 GPUs x 32",
    "glass": "GLASS: batch 32",
    "slotdiffusion": "SlotDiffusion: batch 64 on one GPU",
    "slate": "SLATE: batch 50",
}
# The thesis-stage1 model the MAGE stage-2 objective reads as its teacher, at the sizes
# of the stage-2 run (the slots it matches come from the same encoder).
TEACHER_TINY = (*TINY_MAGE, "decoder.num_layers=1", "decoder.num_heads=2")


def _shapes(image_size: int, images: int) -> list[str]:
    """The embedded shapes scenes at `image_size`, the `images` of one batch kept in memory
    (switching dataset.name drops the preset's COCO params)."""
    return [
        "dataset.name=shapes",
        f"dataset.image_size={image_size}",
        f"dataset.train_size={images}",
        "dataset.val_size=4",
        f"dataset.cache={images}",
    ]


def precision_for(family: Family, policy: str, device: torch.device) -> str:
    """The train.precision a family runs in under `policy` (auto, preset, fp32, bf16, fp16)."""
    if policy in ("fp32", "bf16", "fp16"):
        return policy
    preset = load_config(family.preset).train.precision
    if policy == "preset":
        return preset
    if not family.mixed:
        return preset
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else family.mixed_fallback
    return "bf16"  # fp16 autocast needs CUDA; the CPU stand-in takes the bf16 path


# --- Stable Diffusion 2.1 architectures with random weights ---------------------------------

# stabilityai/stable-diffusion-2-1 unet/config.json and vae/config.json: the sizes that
# set the step's cost. The tiny ones keep the same block types at CPU size.
SD21_UNET: dict[str, Any] = {
    "sample_size": 96,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}
SD21_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def random_stable_diffusion(folder: Path, tiny: bool) -> Path:
    """A diffusers folder (unet/, vae/, scheduler/) of SD 2.1's UNet and VAE with random
    weights, which `decoder.pretrained` loads as it would the real one (no text encoder:
    the null condition is then the learned one, unused at cond_drop_prob 0). Written once
    per folder: the SD 2.1-sized one holds about 3.6 GB of fp32 weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ocl_bench.decoders.latent_diffusion import SD21_SCHEDULER

    if (folder / "COMPLETE").is_file():
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD21_UNET))
        unet.save_pretrained(folder / "unet")
        del unet
        AutoencoderKL(**(TINY_VAE if tiny else SD21_VAE)).save_pretrained(folder / "vae")
    DDPMScheduler(**SD21_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "COMPLETE").write_text("random weights, SD 2.1 architectures\n")
    return folder


# --- one family ----------------------------------------------------------------------------


def family_overrides(
    family: Family,
    work: Path,
    *,
    tiny: bool,
    device: torch.device,
    precision: str,
    batch: int,
    steps: int,
) -> list[str]:
    """The overrides of `family.preset` the benchmark trains (and its teacher, if any)."""
    size = family.tiny_image_size if tiny else family.image_size
    out = [*_shapes(size, batch), *family.full, *(family.tiny if tiny else ())]
    if family.preset in ("stablelsd", "glass-coco"):
        sd = random_stable_diffusion(work / ("sd21-tiny" if tiny else "sd21"), tiny)
        out.append(f"decoder.pretrained={sd}")
    if family.name == "mage":
        out.append(f"objectives.spot_self_training.teacher={_teacher(work, tiny, batch)}")
    out += [
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.warmup_steps=0",  # the lr schedule costs nothing; cosine needs warm-up < steps
        f"train.checkpoint_every={steps}",  # one checkpoint, after the timed steps
        "train.eval_every=0",
        "train.tensorboard=false",
        f"train.device={device.type}",
        f"train.precision={precision}",
        "train.num_workers=0",
    ]
    if tiny:
        out.append("train.threads=1")
    return out


def _teacher(work: Path, tiny: bool, batch: int) -> Path:
    """An untrained thesis-stage1 run at the stage-2 sizes: the MAGE step's teacher."""
    path = work / ("teacher-tiny" if tiny else "teacher")
    if not (path / "checkpoint").is_dir():  # written last: a cut-off write is redone
        shutil.rmtree(path, ignore_errors=True)
        size = FAMILIES["mage"].tiny_image_size if tiny else FAMILIES["mage"].image_size
        overrides = [*_shapes(size, batch), "encoder.random_init=true", "train.device=cpu"]
        overrides += list(TEACHER_TINY) if tiny else []
        write_untrained_run(path, load_raw("thesis-stage1", overrides))
    return path


def read_train_log(path: Path, warmup: int, batch: int) -> dict[str, float]:
    """images/s, data-wait fraction and step times of the steps after `warmup`, from the
    per-step records ThroughputMeter writes to train_log.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise ValueError(f"{path}: no step after the {warmup} warm-up steps")
    seconds = sum(r["step_s"] for r in timed)
    waited = sum(r["step_s"] * r["data_wait"] for r in timed)
    return {
        "images_per_s": batch * len(timed) / seconds,
        "data_wait": waited / seconds,
        "step_s_median": statistics.median(r["step_s"] for r in timed),
        "step_s_min": min(r["step_s"] for r in timed),
        "steps_timed": len(timed),
        "loss": timed[-1]["loss"],
    }


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    """Peak allocated / reserved CUDA memory of the block (None on other devices)."""
    peak: dict[str, int | None] = {"allocated": None, "reserved": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield peak
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak["allocated"] = torch.cuda.max_memory_allocated(device)
        peak["reserved"] = torch.cuda.max_memory_reserved(device)


def run_family(
    name: str,
    work: Path,
    *,
    tiny: bool = False,
    device: str = "cuda",
    precision: str = "auto",
    batch: int | None = None,
    warmup: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train family `name` for warmup + steps steps in `work`; its record (see the module
    docstring for the fields)."""
    family = FAMILIES[name]
    where = torch.device(device)
    warmup = (TINY_WARMUP if tiny else WARMUP) if warmup is None else warmup
    steps = (TINY_STEPS if tiny else STEPS) if steps is None else steps
    batch = (2 if tiny else family.batch) if batch is None else batch
    chosen = precision_for(family, precision, where)
    overrides = family_overrides(
        family,
        work,
        tiny=tiny,
        device=where,
        precision=chosen,
        batch=batch,
        steps=warmup + steps,
    )
    cfg = load_config(family.preset, overrides)
    run_dir = work / "runs" / name
    # A run left by an earlier call in the same --workdir would be resumed, not trained.
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    with _peak_memory(where) as peak:
        train(cfg, run_dir, progress=False)
    wall = time.perf_counter() - began
    figures = read_train_log(run_dir / "train_log.jsonl", warmup, batch)
    if where.type == "cuda":  # the next family starts from an empty allocator
        gc.collect()
        torch.cuda.empty_cache()
    return {
        "family": name,
        "preset": family.preset,
        "status": "ok",
        "image_size": family.tiny_image_size if tiny else family.image_size,
        "batch_size": batch,
        "batch_source": _batch_source(family, batch, tiny),
        "precision": chosen,
        "preset_precision": load_config(family.preset).train.precision,
        **figures,
        "peak_memory_bytes": peak["allocated"],
        "peak_reserved_bytes": peak["reserved"],
        "warmup_steps": warmup,
        "run_seconds": wall,
        "tiny": tiny,
        # the temporary work directory (random SD folder, teacher run) named by a placeholder
        "overrides": [o.replace(str(work), "$WORK") for o in overrides],
    }


def _batch_source(family: Family, batch: int, tiny: bool) -> str:
    """Where the batch size comes from: the paper's recipe, --batch, or the tiny stand-in."""
    if tiny:
        return "tiny"
    return BATCH_NOTE[family.name] if batch == family.batch else "--batch"


# --- the file ------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    """What a later run must match for its figures to compare: versions, GPU, commit."""
    where = torch.device(device)
    gpu: dict[str, Any] = {}
    if where.type == "cuda":
        props = torch.cuda.get_device_properties(where)
        gpu = {
            "gpu": props.name,
            "gpu_memory_bytes": props.total_memory,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_count": torch.cuda.device_count(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return {
        "device": where.type,
        **gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The checkout's HEAD (with '+dirty' when files differ from it), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_all(
    names: list[str],
    work: Path,
    *,
    tiny: bool,
    device: str,
    precision: str,
    batch: int | None,
    warmup: int | None,
    steps: int | None,
    keep_going: bool = True,
) -> dict[str, Any]:
    """Every family of `names` in turn; a family that fails (out of memory) is recorded
    with its error and the others still run, unless keep_going is false."""
    families: dict[str, Any] = {}
    for name in names:
        print(f"{name}: {FAMILIES[name].preset} ...", file=sys.stderr, flush=True)
        try:
            families[name] = run_family(
                name,
                work,
                tiny=tiny,
                device=device,
                precision=precision,
                batch=batch,
                warmup=warmup,
                steps=steps,
            )
        except Exception as err:  # noqa: BLE001 - recorded in the file, the rest still run
            if not keep_going:
                raise
            families[name] = {"family": name, "status": "error", "error": _one_line(err)}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"  {summary(families[name])}", file=sys.stderr, flush=True)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "settings": {"tiny": tiny, "precision": precision, "batch": batch},
        "data": "embedded shapes scenes at each paper's resolution, one batch cached in memory",
        "families": families,
    }


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def summary(record: dict[str, Any]) -> str:
    if record.get("status") != "ok":
        return f"{record.get('status')}: {record.get('error', '')}"
    memory = record["peak_memory_bytes"]
    shown = f"{memory / 2**30:.2f} GiB" if memory is not None else "n/a"
    return (
        f"{record['images_per_s']:.1f} images/s, data wait {record['data_wait']:.1%}, "
        f"peak {shown}, {record['precision']}, batch {record['batch_size']}"
    )


# --- comparing two files -------------------------------------------------------------------


def load_figures(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(environment, {family: record}) of this script's JSON or of pytest-benchmark's
    --benchmark-json output of test_bench_gpu_steps.py (records in extra_info)."""
    data = json.loads(Path(path).read_text())
    if "benchmarks" in data:  # pytest-benchmark
        records = {
            b["extra_info"]["family"]: b["extra_info"]
            for b in data["benchmarks"]
            if "family" in b.get("extra_info", {})
        }
        first = next(iter(records.values()), {})
        return first.get("environment", {}), records
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file (schema {data.get('schema')!r})")
    return data["environment"], data["families"]


def compare(old_path: Path, new_path: Path) -> str:
    """A table of new / old per family: images/s (above 1 = faster), peak memory (below
    1 = less), and both data-wait fractions; environment differences first."""
    old_env, old = load_figures(old_path)
    new_env, new = load_figures(new_path)
    lines = []
    for key in ("gpu", "torch", "cuda", "commit"):
        if old_env.get(key) != new_env.get(key):
            lines.append(f"{key}: {old_env.get(key)} -> {new_env.get(key)}")
    header = ("family", "images/s old", "new", "new/old", "peak mem new/old", "data wait old/new")
    rows = [header]
    for name in [*old, *(n for n in new if n not in old)]:
        a, b = old.get(name, {}), new.get(name, {})
        if a.get("status") != "ok" or b.get("status") != "ok":
            rows.append((name, _status(a), _status(b), "-", "-", "-"))
            continue
        changed = [k for k in ("precision", "batch_size", "image_size") if a.get(k) != b.get(k)]
        label = name + (f" ({', '.join(changed)} differ)" if changed else "")
        rows.append(
            (
                label,
                f"{a['images_per_s']:.2f}",
                f"{b['images_per_s']:.2f}",
                f"{b['images_per_s'] / a['images_per_s']:.2f}x",
                _ratio(b.get("peak_memory_bytes"), a.get("peak_memory_bytes")),
                f"{a['data_wait']:.1%} / {b['data_wait']:.1%}",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _status(record: dict[str, Any]) -> str:
    return str(record.get("status", "missing")) if record else "missing"


def _ratio(new: float | None, old: float | None) -> str:
    if not new or not old or math.isnan(new) or math.isnan(old):
        return "-"
    return f"{new / old:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time each family's training step at paper size (random weights, "
        "synthetic images) and write the figures as JSON; or compare two such files."
    )
    parser.add_argument("--out", type=Path, help="the JSON file to write")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda (cpu with --tiny)"
    )
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "preset", "fp32", "bf16", "fp16"]
    )
    parser.add_argument("--batch", type=int, default=None, help="images per step, every family")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed steps ({WARMUP})")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps ({STEPS})")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized stand-ins (a test)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument(
        "--stop-on-error", action="store_true", help="raise instead of recording a failure"
    )
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    if args.out is None:
        parser.error("--out FILE is required (or --compare OLD NEW)")
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"{CUDA_SKIP}; --tiny runs the CPU stand-ins")
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        result = run_all(
            args.families,
            work,
            tiny=args.tiny,
            device=device,
            precision=args.precision,
            batch=args.batch,
            warmup=args.warmup,
            steps=args.steps,
            keep_going=not args.stop_on_error,
        )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    failed = [n for n, r in result["families"].items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
