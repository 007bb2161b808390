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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import RunConfig, read_toml, resolve
from ocl_bench.run.data import StepBatchSampler, make_dataset
from ocl_bench.run.ema import WeightEMA
from ocl_bench.run.evaluate import probe_task, validation_probe
from ocl_bench.run.event_log import EventLog
from ocl_bench.run.figures import training_figure
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


def train(cfg: RunConfig, run_dir: Path, progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir`, resuming from its last checkpoint if there is one."""
    run_dir = Path(run_dir)
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
    owners = [
        (f"{stage} '{getattr(cfg, stage).name}'", getattr(model, stage))
        for stage in ("encoder", "grouping", "decoder")
    ]
    owners += [(f"objective '{c.name}'", o) for c, o in zip(cfg.objectives, objectives)]
    groups = parameter_groups(t, owners, [model])
    parameters = [q for g in groups for q in g["params"]]
    optimizer = make_optimizer(t, groups, device)
    # A group marked "constant_lr" keeps its peak lr (SLATE's dVAE skips the warm-up).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [(lambda s: 1.0) if g.get("constant_lr") else (lambda s: lr_factor(t, s)) for g in groups],
    )
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    # Hashed once: frozen weights never move, and a frozen UNet takes seconds to hash.
    frozen = checkpoint.frozen_hashes(model)
    ema = WeightEMA(model, t.ema_decay) if t.ema_decay > 0 else None

    ckpt_dir = run_dir / "checkpoint"
    start = 0
    found = checkpoint.recover(ckpt_dir)
    if found is not None:
        checkpoint.load_into(model, found / checkpoint.MODEL_FILE)
        state = checkpoint.load_state(found / checkpoint.STATE_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "objectives" in state:
            objectives.load_state_dict(state["objectives"])
        if ema is not None:
            ema_path = found / checkpoint.EMA_FILE
            if not ema_path.is_file():
                raise DataError(f"{found} holds no averaged weights ({ema_path.name})")
            ema.load_state_dict(checkpoint.load_weights(ema_path), str(ema_path))
        set_rng_state(state["rng"])
        start = int(state["step"])
    if world.size > 1:
        # Different slot-init noise per rank, as a single process would draw for its batch.
        torch.manual_seed(cfg.seed * 7919 + start * 104729 + world.rank)
    trained = model
    if world.size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    log_path = run_dir / "train_log.jsonl"
    eval_log_path = run_dir / "eval_log.jsonl"
    measuring = t.eval_every > 0 and world.main
    probe = validation_probe(cfg, model, device, t.eval_images) if measuring else None
    # the progress line shows the probe's first headline metric (object discovery: fg_ari)
    shown_metrics = {m.name for m in probe_task(cfg).headline_metrics()[:1]} if measuring else set()
    if world.main:
        _truncate_log(log_path, start)
        _truncate_log(eval_log_path, start)

    sampler = StepBatchSampler(
        len(dataset), t.batch_size, cfg.seed, start, t.steps, world.rank, world.size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=MicroBatchSampler(sampler, t.accumulate),
        collate_fn=dataset.collate,
        num_workers=t.num_workers,
        pin_memory=t.pin_memory and device.type == "cuda",
        prefetch_factor=t.prefetch_factor if t.num_workers > 0 else None,
        # A private generator: the default one would draw from the global RNG whenever
        # an iterator starts, so a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    def save(step: int) -> None:
        if not world.main:
            return
        checkpoint.save(
            ckpt_dir,
            model,
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "objectives": objectives.state_dict(),
                "rng": rng_state(),
            },
            frozen=frozen,
            ema=ema.state_dict() if ema is not None else None,
        )

    model.train()
    began = time.perf_counter()
    losses: dict[str, float] = {}
    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=not progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    micro_batches = iter(loader)
    # Model parts whose behaviour follows the step (a Gumbel temperature) implement
    # set_progress(Progress); called before every step, so a resumed run agrees.
    step_followers = [m.set_progress for m in model.modules() if isinstance(m, ModelPart)]
    forward = CompiledOrEager(trained) if t.compile else trained
    events = EventLog(run_dir, start, t.tensorboard and world.main)
    meter = ThroughputMeter()
    with open(log_path if world.main else os.devnull, "a") as log, contextlib.closing(events):
        for step in range(start, t.steps):
            meter.start()
            progress_now = Progress(step, t.steps)
            for follow in step_followers:
                follow(progress_now)
            optimizer.zero_grad(set_to_none=True)
            step_terms: dict[str, torch.Tensor] = {}
            for part in range(t.accumulate):
                with meter.waiting():
                    batch = next(micro_batches).to(device)
                last = part == t.accumulate - 1
                # DDP all-reduces gradients on the last micro-batch only
                sync = (
                    trained.no_sync() if world.size > 1 and not last else contextlib.nullcontext()
                )
                with sync:
                    with autocast(device, t.precision):
                        out = forward(batch)
                        terms = {}
                        for objective in objectives:
                            terms.update(objective(out, batch, progress_now))
                    total = sum(terms.values())
                    if distributed.any_true(not bool(torch.isfinite(total.detach())), device):
                        raise TrainingDiverged(
                            f"loss became {float(total.detach())} at step {step + 1}; stopped, "
                            f"the last good checkpoint (step {_saved_step(ckpt_dir)}) is kept "
                            f"in {ckpt_dir}"
                        )
                    if t.accumulate > 1:
                        total = total / t.accumulate
                        terms = {k: v / t.accumulate for k, v in terms.items()}
                    scaler.scale(total).backward()
                for k, v in terms.items():
                    step_terms[k] = step_terms[k] + v.detach() if k in step_terms else v.detach()
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                clip_gradients(parameters, t.grad_clip, t.grad_clip_norm)
            lr = t.lr * lr_factor(t, step)  # the default group's; other groups scale alike
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            # Logged values are means over all ranks: the global-batch loss.
            losses = {k: distributed.mean(v) for k, v in step_terms.items()}
            loss = distributed.mean(sum(step_terms.values()))
            speed = meter.stop(t.batch_size)
            record = {"step": step + 1, "lr": lr, "loss": loss, **losses, **speed}
            log.write(json.dumps(record) + "\n")
            events.scalars(step + 1, {"loss": loss, "lr": lr, **losses}, "train")
            events.scalars(step + 1, speed, "throughput")
            bar.set_postfix(
                loss=f"{loss:.4f}",
                lr=f"{lr:.1e}",
                img_s=f"{speed['images_per_s']:.1f}",
                wait=f"{speed['data_wait']:.0%}",
            )
            bar.update(1)
            if probe is not None and (step + 1) % t.eval_every == 0:
                # rank 0 only, on the unwrapped model: no collective runs inside
                with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
                    scores = probe()
                with open(eval_log_path, "a") as eval_log:
                    eval_log.write(json.dumps({"step": step + 1, **scores}) + "\n")
                events.scalars(step + 1, scores, "val")
                shown = ", ".join(
                    f"{k} {v:.3f}"
                    for k, v in scores.items()
                    if k.rsplit(".", 1)[-1] in shown_metrics
                )
                if progress:
                    bar.write(f"step {step + 1}: {shown}")
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                log.flush()
                events.flush()
                save(step + 1)
    bar.close()
    if found is None and start == t.steps == 0:
        save(0)
    if world.main and start < t.steps:
        training_figure(run_dir)
    distributed.barrier()
    return TrainResult(t.steps, start, time.perf_counter() - began, losses)


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
