"""Evaluate a run directory: every configured task, a figure, metrics.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ocl_bench.api.errors import ConfigError, DataError, UnknownPluginError
from ocl_bench.api.runtime import resolve_device, seed_everything, untouched_rng
from ocl_bench.api.tasking import EvalContext, MetricRecord, Task
from ocl_bench.run import checkpoint
from ocl_bench.run.compose import SlotModel, build_model, build_objectives
from ocl_bench.run.config import RunConfig, load_config, read_toml
from ocl_bench.run.data import evaluation_dataset, make_dataset
from ocl_bench.run.ema import apply_averaged
from ocl_bench.run.figures import mask_figure
from ocl_bench.run.protocol import switch_protocol
from ocl_bench.run.registry import registry


def load_run(
    run_dir: str | Path, overrides: list[str] | None = None
) -> tuple[RunConfig, SlotModel, int]:
    """(config, model with its trained weights, step) of a run directory.

    With train.ema_decay > 0 the model carries the averaged weights the run saved
    (override train.ema_decay=0 to evaluate the raw ones)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise DataError(f"{run_dir} is not a run directory: {config_path} not found")
    try:  # resolved alone first, so a bad saved config is blamed on the file, not an override
        load_config(config_path)
    except (ConfigError, UnknownPluginError) as err:
        raise type(err)(f"run config {config_path}: {err}") from None
    cfg = load_config(config_path, overrides)
    found = checkpoint.recover(run_dir / "checkpoint")
    if found is None:
        raise DataError(f"no checkpoint in {run_dir / 'checkpoint'}; train the run first")
    image_size = make_dataset(cfg.dataset, cfg.eval.split).image_size
    with untouched_rng():
        # Seeded as training built it: frozen modules with random init (tiny runs) come
        # back identical, since the checkpoint holds only their hash. The caller's RNG
        # (a trainer building a teacher) is left untouched.
        seed_everything(cfg.seed)
        model = build_model(cfg, image_size)
    checkpoint.load_into(model, found / checkpoint.MODEL_FILE)
    if cfg.train.ema_decay > 0:
        ema_path = found / checkpoint.EMA_FILE
        if not ema_path.is_file():
            raise DataError(
                f"{run_dir} was trained with train.ema_decay={cfg.train.ema_decay} but "
                f"{ema_path} is missing; evaluate the raw weights with train.ema_decay=0"
            )
        apply_averaged(model, checkpoint.load_weights(ema_path), str(ema_path))
    step = checkpoint.saved_step(found)
    return cfg, model, step


@dataclass(frozen=True)
class LoadedRun:
    """A run directory as `ocl_bench.load_run(RUN, with_config=True)` gives it.

    model: the model with its trained weights (as `load_run(RUN)` alone returns it);
    config: the resolved RunConfig the run was trained with (config.toml, plus any
        overrides given to load_run): its dataset, objectives, tasks, seed, ...;
    step: the training step of the checkpoint;
    checkpoint_dir: the checkpoint directory the weights came from.

    `objectives()` and `tasks()` rebuild those of the config as the run had them.
    """

    model: SlotModel
    config: RunConfig
    step: int
    checkpoint_dir: Path

    def objectives(self) -> torch.nn.ModuleList:
        """The run's objectives, connected to `model` (as training builds them), with the
        state the run saved beside its weights (an auxiliary decoder's trained weights, ...)."""
        objectives = build_objectives(self.config, self.model)
        saved = checkpoint.load_state(self.checkpoint_dir / checkpoint.STATE_FILE).get("objectives")
        if saved:
            objectives.load_state_dict(saved)
        return objectives

    def tasks(self) -> list[Any]:
        """The run's evaluation tasks, built from their resolved params (config order)."""
        return [choice.cls(choice.params) for choice in self.config.tasks]


def open_run(run_dir: str | Path, overrides: list[str] | None = None) -> LoadedRun:
    """`load_run` as a LoadedRun (model, config, step, checkpoint directory)."""
    cfg, model, step = load_run(run_dir, overrides)
    found = checkpoint.recover(Path(run_dir) / "checkpoint")
    assert found is not None  # load_run has just read it
    return LoadedRun(model=model, config=cfg, step=step, checkpoint_dir=found)


def evaluate(
    cfg: RunConfig, model: torch.nn.Module, run_dir: Path, step: int, progress: bool = True
) -> dict[str, Any]:
    """Run every task of `cfg`, write metrics.json and the mask figure, return the metrics."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    model = model.to(device).eval()
    ctx = _eval_context(cfg, model, run_dir, device, progress)
    started = time.time()
    records: list[MetricRecord] = []
    info: dict[str, Any] = {}
    figures: list[str] = []
    for choice in cfg.tasks:
        # Same slot-init noise for every task and every evaluation of this checkpoint.
        seed_everything(cfg.seed)
        result = choice.cls(choice.params).evaluate(ctx)
        records.extend(result.records)
        info[choice.name] = result.info
        figures.extend(result.figures)
    figures.extend(_mask_figures(cfg, ctx, run_dir, step))
    metrics = {
        "step": step,
        "config_hash": cfg.digest(),
        "protocol": cfg.protocol,
        "dataset": cfg.dataset.name,
        "split": cfg.eval.split,
        "seconds": round(time.time() - started, 3),
        "summary": {r.key: r.value for r in records},
        # Per-image values go to the results store (returned below), not to metrics.json,
        # where thousands of numbers per metric would bury the ones a reader looks for.
        "records": [
            {
                **{k: v for k, v in r.__dict__.items() if k != "per_image"},
                "resolution": list(r.resolution) if r.resolution else None,
            }
            for r in records
        ],
        "info": info,
        "figures": figures,
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, allow_nan=True))
    tmp.replace(run_dir / "metrics.json")
    for record, saved in zip(records, metrics["records"], strict=True):
        if record.per_image is not None:
            saved["per_image"] = record.per_image
    return metrics


def _eval_context(
    cfg: RunConfig, model: torch.nn.Module, run_dir: Path, device: torch.device, progress: bool
) -> EvalContext:
    """What every task of `cfg` evaluates with; each split's dataset is opened once."""
    cache: dict[str, Any] = {}

    def dataset(split: str) -> Any:
        if split not in cache:
            # a synthetic training split hands tasks its real images (a property probe fits
            # on real training images, not on generated ones)
            cache[split] = evaluation_dataset(cfg.dataset, split)
        return cache[split]

    return EvalContext(
        model=model,
        dataset=dataset,
        split=cfg.eval.split,
        num_images=cfg.eval.num_images,
        batch_size=cfg.eval.batch_size,
        device=device,
        precision=cfg.train.precision,
        progress=progress,
        out_dir=run_dir,
    )


def _mask_figures(cfg: RunConfig, ctx: EvalContext, run_dir: Path, step: int) -> list[str]:
    """The first eval.figure_images images with their decoder and attention masks."""
    if cfg.eval.figure_images <= 0:
        return []
    seed_everything(cfg.seed)
    batch, out = next(ctx.predictions(count=cfg.eval.figure_images, desc="figure"))
    has_decoder_masks = out.decoding.masks is not None
    paths = []
    for source in ("decoder", "attn") if has_decoder_masks else ("attn",):
        path = run_dir / "figures" / f"step{step:07d}_{source}.png"
        paths.append(str(mask_figure(batch, out, path, cfg.eval.figure_images, source)))
    return paths


def probe_task(cfg: RunConfig) -> Task:
    """The task a run scores while training: its config's first validation-probe task, else
    the first registered one at its default params."""
    for choice in cfg.tasks:
        if choice.cls.validation_probe:
            return choice.cls(choice.params)
    reg = registry()
    for name in reg.names("task"):
        cls = reg.get("task", name)
        if cls.validation_probe:
            return cls(cls.Params())
    raise ConfigError(
        "train.eval_every needs a task that can score while training; none is installed"
    )


def validation_probe(
    cfg: RunConfig, model: torch.nn.Module, device: torch.device, num_images: int
) -> Callable[[], dict[str, float]]:
    """A function that scores object discovery on the first `num_images` images of the
    eval split, for measuring while training. The dataset is opened once, here.

    Each call runs under a forked RNG and gives the model back in training mode, so a run
    measured this way trains exactly as one that is not. Scores the config's first task
    that is a validation probe (Task.validation_probe: object discovery), else such a task
    with its default params."""
    task = probe_task(cfg)
    data = make_dataset(cfg.dataset, cfg.eval.split)
    ctx = EvalContext(
        model=model,
        dataset=lambda split: data,
        split=cfg.eval.split,
        num_images=num_images,
        batch_size=cfg.eval.batch_size,
        device=device,
        precision=cfg.train.precision,
        progress=False,
    )
    devices = [device] if device.type == "cuda" else []

    def probe() -> dict[str, float]:
        with untouched_rng(devices):
            seed_everything(cfg.seed)
            try:
                records = task.evaluate(ctx).records
            finally:
                model.train()
        return {r.key: r.value for r in records}

    return probe


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    protocol: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory into its metrics.json; with `protocol` (a protocol name, ''
    for none), re-score its checkpoint under that evaluation protocol instead, into
    RUN/protocols/NAME/ (metrics.json, config.toml, figures), leaving the run's own
    results as they are."""
    run_dir = Path(run_dir)
    out_dir = run_dir
    if protocol is not None:
        config_path = run_dir / "config.toml"
        if not config_path.is_file():
            raise DataError(f"{run_dir} is not a run directory: {config_path} not found")
        switch = switch_protocol(read_toml(config_path), protocol, registry())
        overrides = [*switch, *(overrides or [])]
        out_dir = run_dir / "protocols" / (Path(protocol).stem if protocol else "none")
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg, model, step = load_run(run_dir, overrides)
    if protocol is not None:
        (out_dir / "config.toml").write_text(cfg.to_toml())
    metrics = evaluate(cfg, model, out_dir, step, progress)
    return metrics
