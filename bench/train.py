"""The training loop: seeded, resumable after any kill, stops cleanly on a non-finite loss."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ocl_bench import checkpoint, distributed
from ocl_bench.compose import build_model, build_objectives
from ocl_bench.config import RunConfig, read_toml
from ocl_bench.data import StepBatchSampler, make_dataset
from ocl_bench.errors import ConfigError, TrainingDiverged
from ocl_bench.evaluate import validation_probe
from ocl_bench.figures import training_figure
from ocl_bench.runtime import autocast, resolve_device, rng_state, seed_everything, set_rng_state

# Settings that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = {
    ("train", "steps"),
    ("train", "checkpoint_every"),
    ("train", "num_workers"),
    ("train", "threads"),
    ("train", "device"),
    ("train", "eval_every"),
    ("train", "eval_images"),
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
        old = _flatten(read_toml(path))
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


def train(cfg: RunConfig, run_dir: Path, progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir`, resuming from its last checkpoint if there is one."""
    run_dir = Path(run_dir)
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    world, device = distributed.setup(resolve_device(t.device))
    seed_everything(cfg.seed)
    dataset = make_dataset(cfg.dataset, "train")
    model = build_model(cfg, dataset.image_size).to(device)
    objectives = build_objectives(cfg).to(device)
    # Only once the model is built: a bad combination or param leaves no run directory.
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir)
    distributed.barrier()
    parameters = [
        p for p in list(model.parameters()) + list(objectives.parameters()) if p.requires_grad
    ]
    optimizer = torch.optim.AdamW(parameters, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(t, s))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

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
    if world.main:
        _truncate_log(log_path, start)
        _truncate_log(eval_log_path, start)

    sampler = StepBatchSampler(
        len(dataset), t.batch_size, cfg.seed, start, t.steps, world.rank, world.size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=t.num_workers,
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
    with open(log_path if world.main else os.devnull, "a") as log:
        for step, batch in zip(range(start, t.steps), loader):
            batch = batch.to(device)
            with autocast(device, t.precision):
                out = trained(batch)
                terms = {}
                for objective in objectives:
                    terms.update(objective(out, batch))
            total = sum(terms.values())
            if distributed.any_true(not bool(torch.isfinite(total.detach())), device):
                raise TrainingDiverged(
                    f"loss became {float(total.detach())} at step {step + 1}; stopped, the "
                    f"last good checkpoint (step {_saved_step(ckpt_dir)}) is kept in {ckpt_dir}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                norm_type = math.inf if t.grad_clip_norm == "inf" else 2.0
                torch.nn.utils.clip_grad_norm_(parameters, t.grad_clip, norm_type=norm_type)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            # Logged values are means over all ranks: the global-batch loss.
            losses = {k: distributed.mean(v.detach()) for k, v in terms.items()}
            loss = distributed.mean(total.detach())
            log.write(json.dumps({"step": step + 1, "lr": lr, "loss": loss, **losses}) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
            bar.update(1)
            if probe is not None and (step + 1) % t.eval_every == 0:
                # rank 0 only, on the unwrapped model: no collective runs inside
                scores = probe()
                with open(eval_log_path, "a") as eval_log:
                    eval_log.write(json.dumps({"step": step + 1, **scores}) + "\n")
                shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if "fg_ari" in k)
                if progress:
                    bar.write(f"step {step + 1}: {shown}")
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                log.flush()
                save(step + 1)
    bar.close()
    if found is None and start == t.steps == 0:
        save(0)
    if world.main and start < t.steps:
        training_figure(run_dir)
    distributed.barrier()
    return TrainResult(t.steps, start, time.perf_counter() - began, losses)


def _saved_step(ckpt_dir: Path) -> int:
    done = ckpt_dir / checkpoint.DONE_FILE
    return int(done.read_text()) if done.exists() else 0


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
