"""The training loop: seeded, resumable after any kill, stops cleanly on a non-finite loss.

What the loop offers the plugins of every model family:

- Parameter groups. An encoder, grouping, decoder or objective module may define
  `param_groups(self) -> list[dict]`: torch param-group dicts with "params" (its own
  parameters; frozen ones are skipped) and optionally "lr" and/or "lr_scale" (the group's
  peak lr is lr (default train.lr) times lr_scale), "weight_decay" and/or
  "weight_decay_scale" (likewise from train.weight_decay), and any other AdamW option
  ("betas", "eps"). Parameters no plugin claims form the default group (train.lr,
  train.weight_decay). The lr schedule scales every group's own peak lr by the same factor
  (LambdaLR). train.no_decay_norm_bias splits every group so that the weights of
  normalisation layers and every bias train with weight decay 0; train.betas are the
  Adam betas of every group that does not set its own.
- Progress. Objectives are called as `objective(out, batch, progress)` with
  `contracts.Progress(step, total)`: the 0-based optimiser step being computed and
  train.steps, so weight schedules and stage switches need no copy of train.steps. Any
  model submodule with `set_progress(progress)` is told the step before each step's
  forward pass (a tokenizer's temperature schedule).
- A param group with "constant_lr": True keeps its peak lr; the others follow train's
  schedule.
- Gradient accumulation. train.batch_size stays the global batch of one optimiser step
  (so a preset's recipe holds whatever the memory) and train.accumulate splits each
  process's share into that many micro-batches; each micro-batch loss is divided by
  train.accumulate, so for a per-image mean loss the step equals the unsplit one. Under
  DDP the gradients are all-reduced only on the last micro-batch (no_sync before).
- EMA. train.ema_decay > 0 keeps an exponential moving average of the trainable weights
  (ocl_bench.run.ema), saved with each checkpoint and used by every evaluation.
- Frozen modules. Checkpoints store a hash of each frozen module instead of its weights
  (checkpoint.frozen_hashes); a resume or evaluation rebuilds them from their pretrained
  source and checks the hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ocl_bench.api.contracts import Progress
from ocl_bench.api.errors import ConfigError, DataError, TrainingDiverged, UserError
from ocl_bench.api.plugin import ModelPart
from ocl_bench.api.runtime import (
    autocast,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from ocl_bench.run import checkpoint, distributed
from ocl_bench.run.compose import SlotModel, build_model, build_objectives
from ocl_bench.run.config import RunConfig, read_toml, resolve
from ocl_bench.run.data import StepBatchSampler, make_dataset
from ocl_bench.run.ema import WeightEMA
from ocl_bench.run.evaluate import probe_task, validation_probe
from ocl_bench.run.event_log import EventLog
from ocl_bench.run.figures import training_figure
from ocl_bench.run.progress import TRAINING
from ocl_bench.run.throughput import ThroughputMeter

# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {
    ("train", "steps"),
    ("train", "checkpoint_every"),
    ("train", "num_workers"),
    ("train", "threads"),
    ("train", "device"),
    ("train", "eval_every"),
    ("train", "eval_images"),
    ("train", "compile"),
    ("train", "pin_memory"),
    ("train", "prefetch_factor"),
    ("train", "tensorboard"),
    ("dataset", "cache"),  # samples kept in memory are the samples drawn again
}


@dataclass
class TrainResult:
    step: int
    resumed_from: int
    seconds: float
    last_losses: dict[str, float]


def _flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    """Write config.toml, or check that an existing run was made with the same config."""
    path = run_dir / "config.toml"
    if path.exists():
        old_raw = read_toml(path)
        try:
            # Resolved again, settings added since the run was written count as their
            # defaults instead of as changes.
            old = _flatten(resolve(old_raw).to_dict())
        except UserError:
            old = _flatten(old_raw)
        new = _flatten(cfg.to_dict())
        changed = sorted(
            ".".join(k)
            for k in set(old) | set(new)
            if k[:2] not in RESUMABLE_CHANGES
            and k[0] not in ("eval", "tasks")
            and old.get(k) != new.get(k)
        )
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(changed[:5])}); "
                "use another --out or the same settings"
            )
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(cfg.to_toml())
    tmp.replace(path)


def lr_factor(settings: Any, step: int) -> float:
    """The lr at `step` as a fraction of `settings.lr`."""
    if settings.schedule == "cosine":
        return _cosine_factor(settings, step)
    if settings.schedule == "half_life_after_warmup":
        # OCLF's exponential_decay_after_optional_warmup (ocl/scheduling.py)
        w, half = settings.warmup_steps, settings.decay_half_life
        if step < w:
            return step / w
        return 0.5 ** ((step - w) / half) if half > 0 else 1.0
    warm = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps > 0 else 1.0
    if settings.decay_half_life > 0:
        return warm * 0.5 ** (step / settings.decay_half_life)
    return warm


def _cosine_factor(settings: Any, step: int) -> float:
    # SPOT's utils_spot.cosine_scheduler: np.linspace(0, lr, W) for the warm-up (so step 0
    # trains at lr 0), then min_lr + (lr - min_lr)(1 + cos(pi i / (steps - W))) / 2.
    w, lr = settings.warmup_steps, settings.lr
    if step < w:
        return step / (w - 1) if w > 1 else 0.0
    i = min(step, settings.steps - 1) - w
    floor = settings.min_lr / lr if lr > 0 else 0.0
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * i / (settings.steps - w)))


# Names of the param-group keys the trainer resolves itself (the rest go to AdamW as is).
GROUP_SCALES = {"lr": "lr_scale", "weight_decay": "weight_decay_scale"}
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _no_decay_ids(modules: list[nn.Module]) -> set[int]:
    """ids of norm-layer weights and of every bias (by name: 'bias', 'in_proj_bias', ...).
    A custom norm counts when its class name contains 'Norm' (timm's RmsNorm, LayerNorm2d)."""
    out: set[int] = set()
    for root in modules:
        for module in root.modules():
            is_norm = isinstance(module, NORM_LAYERS) or "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if is_norm or name.endswith("bias"):
                    out.add(id(param))
    return out


def parameter_groups(
    settings: Any, owners: list[tuple[str, nn.Module]], extra: list[nn.Module] = ()
) -> list[dict[str, Any]]:
    """AdamW param groups: the default group first, then each plugin's own groups in
    `owners` order, each split into decay / no-decay parts when no_decay_norm_bias is on.
    Every group carries "name" (for logs) and its resolved "lr" and "weight_decay"."""
    modules = [m for _, m in owners] + list(extra)
    trainable: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                trainable.setdefault(id(param), param)
    claimed: dict[int, str] = {}
    declared: list[dict[str, Any]] = []
    for owner, module in owners:
        if not isinstance(module, ModelPart):
            continue
        for i, spec in enumerate(module.param_groups()):
            where = f"{owner} param_groups()[{i}]"
            group = dict(spec)
            if "params" not in group:
                raise TypeError(f"{where} has no 'params'")
            params = [q for q in group.pop("params") if q.requires_grad]
            for q in params:
                if id(q) not in trainable:
                    raise ValueError(f"{where} lists a parameter that is not in the model")
                if id(q) in claimed:
                    raise ValueError(f"{where} lists a parameter already in {claimed[id(q)]}")
                claimed[id(q)] = where
            for key, scale in GROUP_SCALES.items():
                base = getattr(settings, key)
                group[key] = float(group.pop(key, base)) * float(group.pop(scale, 1.0))
            group.setdefault("name", f"{owner}.{i}")
            declared.append({**group, "params": params})
    default = {
        "name": "default",
        "params": [q for k, q in trainable.items() if k not in claimed],
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
    }
    groups = [default, *declared]
    if settings.no_decay_norm_bias:
        exempt = _no_decay_ids(modules)
        split = []
        for group in groups:
            decay = [q for q in group["params"] if id(q) not in exempt]
            no_decay = [q for q in group["params"] if id(q) in exempt]
            split.append({**group, "params": decay})
            split.append(
                {
                    **group,
                    "params": no_decay,
                    "weight_decay": 0.0,
                    "name": f"{group['name']}.no_decay",
                }
            )
        groups = split
    return [g for g in groups if g["params"]]


def make_optimizer(
    settings: Any, groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over `groups`; one fused kernel for all tensors where torch has it
    (train.fused_optimizer; CPU since torch 2.4, CUDA), else torch's foreach version."""
    fused = settings.fused_optimizer and device.type in ("cpu", "cuda")
    options = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    options["betas"] = tuple(settings.betas)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **options)
        except (RuntimeError, TypeError):  # an older torch without the fused CPU kernel
            pass
    return torch.optim.AdamW(groups, **options)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, norm: str) -> torch.Tensor:
    """clip_grad_norm_ with the same result; the inf-norm reads each gradient once
    (aminmax) instead of torch's per-tensor linalg.vector_norm, ~4x faster on CPU."""
    grads = [q.grad for q in parameters if q.grad is not None]
    clip_with = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if norm != "inf" or not grads or clip_with is None:
        norm_type = math.inf if norm == "inf" else 2.0
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
    extremes = [torch.aminmax(g) for g in grads]
    total = torch.stack([torch.maximum(lo.abs(), hi.abs()) for lo, hi in extremes]).max()
    clip_with(parameters, max_norm, total)
    return total


class MicroBatchSampler(Sampler[list[int]]):
    """Each step's batch of a StepBatchSampler as `parts` equal consecutive micro-batches."""

    def __init__(self, steps: StepBatchSampler, parts: int):
        self.steps, self.parts = steps, parts

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.steps:
            size = len(indices) // self.parts
            for i in range(self.parts):
                yield indices[i * size : (i + 1) * size]

    def __len__(self) -> int:
        return len(self.steps) * self.parts


@dataclass
class _Run:
    """What a training run holds from its set-up to its last step."""

    cfg: RunConfig
    run_dir: Path
    world: distributed.World
    device: torch.device
    dataset: Any
    model: SlotModel
    objectives: nn.ModuleList
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    # Hashed once: frozen weights never move, and a frozen UNet takes seconds to hash.
    frozen: dict[str, str]
    ema: WeightEMA | None
    start: int = 0
    found: Path | None = None  # the checkpoint resumed from
    # Every rank's RNG state at the checkpoint resumed from (saved under DDP only).
    rank_rng: list[dict[str, torch.Tensor]] | None = None
    trained: nn.Module | None = None  # the model, or its DDP wrapper

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoint"


@dataclass
class _Reporter:
    """Where each step goes: the train log, TensorBoard, the progress bar and, every
    train.eval_every steps, the validation probe's scores."""

    log: IO[str]
    events: EventLog
    bar: tqdm
    meter: ThroughputMeter
    probe: Callable[[], dict[str, float]] | None
    shown_metrics: set[str]
    eval_log_path: Path
    progress: bool


def train(cfg: RunConfig, run_dir: Path, progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir`, resuming from its last checkpoint if there is one."""
    t = cfg.train
    run = _set_up(cfg, Path(run_dir))
    _resume(run)
    _distribute(run)
    probe, shown_metrics = _validation(run)
    loader = _make_loader(run)
    run.model.train()
    began = time.perf_counter()
    losses: dict[str, float] = {}
    bar = tqdm(
        total=t.steps,
        initial=run.start,
        disable=not progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    micro_batches = iter(loader)
    # Model parts whose behaviour follows the step (a Gumbel temperature) implement
    # set_progress(Progress); called before every step, so a resumed run agrees.
    step_followers = [m.set_progress for m in run.model.modules() if isinstance(m, ModelPart)]
    forward = CompiledOrEager(run.trained) if t.compile else run.trained
    events = EventLog(run.run_dir, run.start, t.tensorboard and run.world.main)
    meter = ThroughputMeter()
    log_path = run.run_dir / "train_log.jsonl" if run.world.main else os.devnull
    with open(log_path, "a") as log, contextlib.closing(events), distributed.stop_point():
        eval_log_path = run.run_dir / "eval_log.jsonl"
        report = _Reporter(log, events, bar, meter, probe, shown_metrics, eval_log_path, progress)
        for step in range(run.start, t.steps):
            meter.start()
            step_terms = _train_step(run, step, forward, micro_batches, step_followers, meter)
            losses = _log_step(run, report, step, step_terms)
            _probe(run, report, step)
            _checkpoint_if_due(run, report, step)
            _stop_if_agreed(run, report, step)
    bar.close()
    _finish(run)
    return TrainResult(t.steps, run.start, time.perf_counter() - began, losses)


def _set_up(cfg: RunConfig, run_dir: Path) -> _Run:
    """Seed, build the data, model, objectives and optimiser; write the run's config."""
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    world, device = distributed.setup(resolve_device(t.device))
    if t.batch_size % (world.size * t.accumulate):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) does not split into {world.size} processes x "
            f"train.accumulate ({t.accumulate}) equal micro-batches"
        )
    seed_everything(cfg.seed)
    dataset = make_dataset(cfg.dataset, "train")
    model = build_model(cfg, dataset.image_size).to(device)
    objectives = build_objectives(cfg, model).to(device)
    # Only once the model is built: a bad combination or param leaves no run directory.
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir)
    distributed.barrier()
    groups = parameter_groups(t, _group_owners(cfg, model, objectives), [model])
    optimizer = make_optimizer(t, groups, device)
    # A group marked "constant_lr" keeps its peak lr (SLATE's dVAE skips the warm-up).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [(lambda s: 1.0) if g.get("constant_lr") else (lambda s: lr_factor(t, s)) for g in groups],
    )
    return _Run(
        cfg=cfg,
        run_dir=run_dir,
        world=world,
        device=device,
        dataset=dataset,
        model=model,
        objectives=objectives,
        parameters=[q for g in groups for q in g["params"]],
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
        frozen=checkpoint.frozen_hashes(model),
        ema=WeightEMA(model, t.ema_decay) if t.ema_decay > 0 else None,
    )


def _group_owners(
    cfg: RunConfig, model: SlotModel, objectives: nn.ModuleList
) -> list[tuple[str, nn.Module]]:
    """The modules that may declare param groups, each with the name errors give it."""
    owners: list[tuple[str, nn.Module]] = [
        (f"{stage} '{getattr(cfg, stage).name}'", getattr(model, stage))
        for stage in ("encoder", "grouping", "decoder")
    ]
    owners += [(f"objective '{c.name}'", o) for c, o in zip(cfg.objectives, objectives)]
    return owners


def _resume(run: _Run) -> None:
    """Load the last complete checkpoint, if any, with the RNG state it was saved with."""
    found = checkpoint.recover(run.ckpt_dir)
    if found is None:
        return
    checkpoint.load_into(run.model, found / checkpoint.MODEL_FILE)
    state = checkpoint.load_state(found / checkpoint.STATE_FILE)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "objectives" in state:
        run.objectives.load_state_dict(state["objectives"])
    if run.ema is not None:
        ema_path = found / checkpoint.EMA_FILE
        if not ema_path.is_file():
            raise DataError(f"{found} holds no averaged weights ({ema_path.name})")
        run.ema.load_state_dict(checkpoint.load_weights(ema_path), str(ema_path))
    set_rng_state(state["rng"])
    run.found, run.start = found, int(state["step"])
    run.rank_rng = state.get("rank_rng")


def _distribute(run: _Run) -> None:
    """Under torchrun: seed each rank apart and wrap the model in DDP."""
    run.trained = run.model
    if run.world.size == 1:
        return
    if run.rank_rng is not None and len(run.rank_rng) == run.world.size:
        # Each rank draws on where it stopped, as it would have without the interruption.
        set_rng_state(run.rank_rng[run.world.rank])
    else:
        # Different slot-init noise per rank, as a single process would draw for its batch.
        torch.manual_seed(run.cfg.seed * 7919 + run.start * 104729 + run.world.rank)
    run.trained = torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
    )


def _validation(run: _Run) -> tuple[Callable[[], dict[str, float]] | None, set[str]]:
    """The validation probe (rank 0, train.eval_every > 0) and the metrics the progress line
    shows; the logs lose the lines past the resumed step, which will be redone."""
    t = run.cfg.train
    measuring = t.eval_every > 0 and run.world.main
    probe = validation_probe(run.cfg, run.model, run.device, t.eval_images) if measuring else None
    # the progress line shows the probe's first headline metric (object discovery: fg_ari)
    shown = {m.name for m in probe_task(run.cfg).headline_metrics()[:1]} if measuring else set()
    if run.world.main:
        _truncate_log(run.run_dir / "train_log.jsonl", run.start)
        _truncate_log(run.run_dir / "eval_log.jsonl", run.start)
    return probe, shown


def _make_loader(run: _Run) -> DataLoader:
    """This rank's micro-batches from the resumed step on."""
    cfg, t = run.cfg, run.cfg.train
    sampler = StepBatchSampler(
        len(run.dataset), t.batch_size, cfg.seed, run.start, t.steps, run.world.rank, run.world.size
    )
    return DataLoader(
        run.dataset,
        batch_sampler=MicroBatchSampler(sampler, t.accumulate),
        collate_fn=run.dataset.collate,
        num_workers=t.num_workers,
        pin_memory=t.pin_memory and run.device.type == "cuda",
        prefetch_factor=t.prefetch_factor if t.num_workers > 0 else None,
        # A private generator: the default one would draw from the global RNG whenever
        # an iterator starts, so a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _train_step(
    run: _Run,
    step: int,
    forward: Callable[..., Any],
    micro_batches: Iterator[Any],
    step_followers: list[Callable[[Progress], None]],
    meter: ThroughputMeter,
) -> dict[str, torch.Tensor]:
    """One optimiser step over train.accumulate micro-batches; the step's loss terms."""
    t = run.cfg.train
    progress_now = Progress(step, t.steps)
    for follow in step_followers:
        follow(progress_now)
    run.optimizer.zero_grad(set_to_none=True)
    step_terms: dict[str, torch.Tensor] = {}
    for part in range(t.accumulate):
        with meter.waiting():
            batch = next(micro_batches).to(run.device)
        last = part == t.accumulate - 1
        terms = _backward(run, step, forward, batch, progress_now, last)
        for k, v in terms.items():
            step_terms[k] = step_terms[k] + v.detach() if k in step_terms else v.detach()
    if t.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        clip_gradients(run.parameters, t.grad_clip, t.grad_clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return step_terms


def _backward(
    run: _Run,
    step: int,
    forward: Callable[..., Any],
    batch: Any,
    progress_now: Progress,
    last: bool,
) -> dict[str, torch.Tensor]:
    """Forward and backward one micro-batch; its loss terms, divided by train.accumulate.
    Raises TrainingDiverged on every rank when the loss is not finite on any."""
    t = run.cfg.train
    # DDP all-reduces gradients on the last micro-batch only
    sync = run.trained.no_sync() if run.world.size > 1 and not last else contextlib.nullcontext()
    with sync:
        with autocast(run.device, t.precision):
            out = forward(batch)
            terms = {}
            for objective in run.objectives:
                terms.update(objective(out, batch, progress_now))
        total = sum(terms.values())
        if distributed.any_true(not bool(torch.isfinite(total.detach())), run.device):
            raise TrainingDiverged(
                f"loss became {float(total.detach())} at step {step + 1}; stopped, "
                f"the last good checkpoint (step {_saved_step(run.ckpt_dir)}) is kept "
                f"in {run.ckpt_dir}"
            )
        if t.accumulate > 1:
            total = total / t.accumulate
            terms = {k: v / t.accumulate for k, v in terms.items()}
        run.scaler.scale(total).backward()
    return terms


def _log_step(
    run: _Run, report: _Reporter, step: int, step_terms: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Write the step's losses, lr and speed to the log, TensorBoard and the progress bar;
    the losses as logged."""
    t = run.cfg.train
    lr = t.lr * lr_factor(t, step)  # the default group's; other groups scale alike
    # Logged values are means over all ranks: the global-batch loss.
    losses = {k: distributed.mean(v) for k, v in step_terms.items()}
    loss = distributed.mean(sum(step_terms.values()))
    speed = report.meter.stop(t.batch_size)
    record = {"step": step + 1, "lr": lr, "loss": loss, **losses, **speed}
    report.log.write(json.dumps(record) + "\n")
    report.events.scalars(step + 1, {"loss": loss, "lr": lr, **losses}, "train")
    report.events.scalars(step + 1, speed, "throughput")
    report.bar.set_postfix(
        loss=f"{loss:.4f}",
        lr=f"{lr:.1e}",
        img_s=f"{speed['images_per_s']:.1f}",
        wait=f"{speed['data_wait']:.0%}",
    )
    report.bar.update(1)
    TRAINING.report(step + 1, t.steps)  # for whoever shows this process's progress elsewhere
    return losses


def _probe(run: _Run, report: _Reporter, step: int) -> None:
    """Score the validation probe after every train.eval_every-th step (rank 0 only)."""
    if report.probe is None or (step + 1) % run.cfg.train.eval_every != 0:
        return
    ema = run.ema
    # rank 0 only, on the unwrapped model: no collective runs inside
    with ema.swapped_into(run.model) if ema is not None else contextlib.nullcontext():
        scores = report.probe()
    with open(report.eval_log_path, "a") as eval_log:
        eval_log.write(json.dumps({"step": step + 1, **scores}) + "\n")
    report.events.scalars(step + 1, scores, "val")
    shown = ", ".join(
        f"{k} {v:.3f}" for k, v in scores.items() if k.rsplit(".", 1)[-1] in report.shown_metrics
    )
    if report.progress:
        report.bar.write(f"step {step + 1}: {shown}")


def _checkpoint_if_due(run: _Run, report: _Reporter, step: int) -> None:
    """Save after every train.checkpoint_every-th step and after the last one, logs first."""
    t = run.cfg.train
    if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
        report.log.flush()
        report.events.flush()
        _save(run, step + 1)


def _save(run: _Run, step: int) -> None:
    """The checkpoint of `step` (rank 0 writes it; under DDP with every rank's RNG state,
    which every rank must call this for)."""
    ranks = distributed.gather(rng_state()) if run.world.size > 1 else None
    if not run.world.main:
        return
    state = {
        "step": step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "objectives": run.objectives.state_dict(),
        "rng": rng_state(),
    }
    if ranks is not None:
        state["rank_rng"] = ranks
    checkpoint.save(
        run.ckpt_dir,
        run.model,
        state,
        frozen=run.frozen,
        ema=run.ema.state_dict() if run.ema is not None else None,
    )


def _stop_if_agreed(run: _Run, report: _Reporter, step: int) -> None:
    """After a step that is not the last: if the ranks agree a stop was asked for (a
    scheduler's signal, see distributed), save this step's checkpoint unless just saved and
    raise Preempted on every rank."""
    t = run.cfg.train
    if step + 1 == t.steps or not distributed.stop_agreed(run.device):
        return
    if (step + 1) % t.checkpoint_every:
        report.log.flush()
        report.events.flush()
        _save(run, step + 1)
    report.bar.close()
    distributed.barrier()  # the checkpoint is complete before any rank leaves
    raise distributed.Preempted(step + 1)


def _finish(run: _Run) -> None:
    """A zero-step run still leaves a checkpoint; a run that trained draws its figure."""
    t = run.cfg.train
    if run.found is None and run.start == t.steps == 0:
        _save(run, 0)
    if run.world.main and run.start < t.steps:
        training_figure(run.run_dir)
    distributed.barrier()


class CompiledOrEager:
    """`torch.compile(module)`, or the module itself where compiling fails.

    Compilation happens at the first call of each input signature (the shapes, dtypes and
    devices of the tensors, and the plain values, of the call's arguments: what makes
    torch.compile trace again); if it raises, that call is redone eagerly from the same RNG
    state (the slot noise it drew is drawn again), a one-line warning names the error, and
    every later call runs eagerly. Once a signature has run compiled, its calls no longer
    snapshot the RNG state (a copy of every generator per step): an error there is the
    model's own and propagates, as it would uncompiled.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.compiled: Any = None
        self.failed = False
        self.compiled_signatures: set[tuple[Any, ...]] = set()
        try:
            self.compiled = torch.compile(module)
        except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
            self._fall_back(err)

    def _fall_back(self, err: BaseException) -> None:
        self.failed, self.compiled = True, None
        first = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"train.compile: cannot compile ({type(err).__name__}: {first}); training uncompiled",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        signature = call_signature((args, kwargs))
        if signature in self.compiled_signatures:
            return self.compiled(*args, **kwargs)
        state = rng_state()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the eager retry re-raises real errors
            self._fall_back(err)
            set_rng_state(state)
            return self.module(*args, **kwargs)
        self.compiled_signatures.add(signature)
        return out


def call_signature(value: Any) -> tuple[Any, ...]:
    """What torch.compile specialises a call on, as a hashable key: each tensor's shape,
    dtype, device and requires_grad; the structure of dataclasses, dicts, lists and
    tuples; numbers, booleans and None by value. Strings count by type only: a batch's
    captions differ every step and feed no traced tensor code."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (type(value), *(call_signature(getattr(value, f.name)) for f in fields))
    if isinstance(value, dict):
        return (dict, *((k, call_signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value), *(call_signature(v) for v in value))
    if isinstance(value, str):
        return (str,)
    if value is None or isinstance(value, (bool, int, float)):
        return (type(value), value)
    return (type(value), id(value))


def _saved_step(ckpt_dir: Path) -> int:
    done = ckpt_dir / checkpoint.DONE_FILE
    return checkpoint.saved_step(ckpt_dir) if done.exists() else 0


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            break  # a line cut by a kill ends the log
    path.write_text("".join(line + "\n" for line in keep))
