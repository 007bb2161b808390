"""Run configuration: TOML file + dotted overrides -> a validated RunConfig."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.params import build_params, hashed_dict, param, to_dict
from ocl_bench.run.protocol import apply_protocol
from ocl_bench.run.registry import Registry, registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STAGES = ("dataset", "encoder", "grouping", "decoder")
COLLECTIONS = {"objectives": "objective", "tasks": "task"}
TOP_LEVEL = ("seed", "protocol", *STAGES, *COLLECTIONS, "train", "eval")


@dataclass(frozen=True)
class TrainSettings:
    steps: int = param(2000, "optimiser steps", ge=1)
    batch_size: int = param(32, "images per step (global, over all processes)", ge=1)
    lr: float = param(4e-4, "peak learning rate (Adam)", ge=0)
    warmup_steps: int = param(200, "linear warm-up steps", ge=0)
    decay_half_life: int = param(0, "steps per halving of the lr after warm-up; 0 = no decay", ge=0)
    schedule: Literal["half_life", "half_life_after_warmup", "cosine"] = param(
        "half_life",
        "lr shape: 'half_life' (warm-up (s+1)/W, halving every decay_half_life steps from"
        " step 0), 'half_life_after_warmup' (OCLF: warm-up s/W, halving counted from the end"
        " of the warm-up) or 'cosine' (SPOT: warm-up s/(W-1), cosine to min_lr at the end)",
    )
    min_lr: float = param(0.0, "final lr of the cosine schedule (SPOT: 4e-7)", ge=0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = param(1.0, "max gradient norm; 0 disables clipping", ge=0)
    grad_clip_norm: Literal["2", "inf"] = param("2", "norm used by clipping ('inf' as SPOT)")
    checkpoint_every: int = param(100, "steps between checkpoints", ge=1)
    eval_every: int = param(
        0,
        "steps between validation measurements while training (object discovery on"
        " train.eval_images images, logged to eval_log.jsonl and plotted); 0 = none",
        ge=0,
    )
    eval_images: int = param(64, "validation images each measurement while training uses", ge=1)
    device: Literal["auto", "cpu", "cuda"] = param("cpu", "where to train")
    precision: Literal["fp32", "bf16", "fp16"] = param("fp32", "autocast precision")
    num_workers: int = param(0, "data loader worker processes", ge=0)
    threads: int = param(0, "torch CPU threads; 0 = torch's default", ge=0)
    accumulate: int = param(
        1,
        "micro-batches per optimiser step (gradient accumulation): batch_size stays the"
        " global batch of one step, each process computes it in this many slices",
        ge=1,
    )
    betas: tuple[float, ...] = param((0.9, 0.999), "Adam betas (beta1, beta2), each in [0, 1)")
    no_decay_norm_bias: bool = param(
        False, "weight decay 0 for normalisation-layer weights and every bias (timm, MAE recipes)"
    )
    ema_decay: float = param(
        0.0,
        "decay of an exponential moving average of the weights, updated every optimiser"
        " step, saved with the checkpoint and used by every evaluation; 0 = off",
        ge=0,
        lt=1,
    )
    compile: bool = param(
        False,
        "torch.compile the model's forward; where it cannot compile, training continues"
        " uncompiled after a one-line warning",
    )
    pin_memory: bool = param(
        True, "page-locked host batches, copied to the GPU asynchronously (cuda only)"
    )
    prefetch_factor: int = param(
        2, "batches each loader worker prepares ahead (with num_workers > 0)", ge=1
    )
    fused_optimizer: bool = param(
        True, "AdamW as one fused kernel over all parameters (CPU, CUDA), else per-tensor foreach"
    )
    tensorboard: bool = param(
        True,
        "also write loss, lr, throughput and validation metrics to a TensorBoard event file"
        " in the run directory (<run>/tensorboard)",
    )

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.accumulate >= 1 and self.batch_size % self.accumulate:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must split into train.accumulate"
                f" ({self.accumulate}) equal micro-batches"
            )
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be at least 1, got {self.batch_size}")
        if self.schedule == "cosine" and self.warmup_steps >= self.steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be below train.steps"
                f" ({self.steps}) for the cosine schedule"
            )


@dataclass(frozen=True)
class EvalSettings:
    split: str = param("val", "dataset split evaluated")
    num_images: int = param(320, "images evaluated (0 = the whole split)", ge=0)
    batch_size: int = param(32, "images per evaluation batch", ge=1)
    figure_images: int = param(4, "images shown in the evaluation figure", ge=0)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class PluginChoice:
    kind: str
    name: str
    params: Any
    cls: type


@dataclass
class RunConfig:
    seed: int
    dataset: PluginChoice
    encoder: PluginChoice
    grouping: PluginChoice
    decoder: PluginChoice
    objectives: list[PluginChoice]
    tasks: list[PluginChoice]
    train: TrainSettings
    eval: EvalSettings
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    # The evaluation protocol applied (ocl_bench.protocols); '' when none applies.
    protocol: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config (every default filled in), with its protocol's name
        ('' = none). The name is recorded, not hashed: the hash covers the settings."""
        out = self._settings(to_dict)
        # always present ('' = none), so a stored config without the key is one stored
        # before protocols existed
        return {"seed": out.pop("seed"), "protocol": self.protocol, **out}

    def _settings(self, flatten: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed}
        for stage in STAGES:
            choice: PluginChoice = getattr(self, stage)
            out[stage] = {"name": choice.name, **flatten(choice.params)}
        for key in COLLECTIONS:
            out[key] = {c.name: flatten(c.params) for c in getattr(self, key)}
        out["train"] = flatten(self.train)
        out["eval"] = flatten(self.eval)
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))

    def digest(self) -> str:
        """A stable hash of the resolved settings. Params added `since` a release are left
        out while at their default (see ocl_bench.api.params.param), so a result stored before
        they existed keeps its hash."""
        text = json.dumps(self._settings(hashed_dict), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def default_text() -> str:
    return resources.files("ocl_bench").joinpath("configs/default.toml").read_text()


def _presets_dir() -> Any:
    return resources.files("ocl_bench").joinpath("configs/presets")


def preset_names() -> list[str]:
    """The named run configs packaged in bench/configs/presets/ (`ocl-bench presets`)."""
    folder = _presets_dir()
    if not folder.is_dir():
        return []
    return sorted(f.name[: -len(".toml")] for f in folder.iterdir() if f.name.endswith(".toml"))


def preset_summary(name: str) -> str:
    """A preset's first comment line."""
    for line in _presets_dir().joinpath(f"{name}.toml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file or, when no such file exists, the preset of that name."""
    p = Path(path)
    if p.is_file():
        where, read = f"config file {p}", p.read_text
    elif str(path) in preset_names():
        where, read = f"preset {path}", _presets_dir().joinpath(f"{path}.toml").read_text
    else:
        presets = ", ".join(preset_names()) or "none"
        raise DataError(f"config file not found: {p} (nor a preset name; presets: {presets})")
    try:
        return tomllib.loads(read())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where} is not valid TOML: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value); value parsed as TOML, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a table")
            node = nxt
        if parts[-1] == "name" and len(parts) == 2 and parts[0] in STAGES:
            # Switching plugin: the previous plugin's params no longer apply.
            old = node.get("name")
            if old is not None and old != value:
                node.clear()
        node[parts[-1]] = value
    return out


def load_raw(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The base config (a file, a preset name, or the embedded default) with overrides applied."""
    raw = read_toml(path) if path is not None else tomllib.loads(default_text())
    return apply_overrides(raw, list(overrides or []))


def _choice(kind: str, section: Any, where: str, reg: Registry) -> PluginChoice:
    if not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be a table")
    values = dict(section)
    name = values.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"'{where}.name' is required (one of: {', '.join(reg.names(kind))})")
    cls = reg.get(kind, name)
    return PluginChoice(kind, name, build_params(cls.Params, values, where), cls)


def resolve(raw: dict[str, Any], reg: Registry | None = None) -> RunConfig:
    """Validate a raw config dict against the registry."""
    reg = reg or registry()
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}'; allowed keys: {', '.join(TOP_LEVEL)}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected int, got {seed!r}")
    raw, protocol = apply_protocol(raw, reg)
    stages = {}
    for stage in STAGES:
        if stage not in raw:
            raise ConfigError(f"missing table '[{stage}]'")
        stages[stage] = _choice(stage, raw[stage], stage, reg)
    collections = {}
    for key, kind in COLLECTIONS.items():
        table = raw.get(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"'{key}' must be a table of {kind} names")
        collections[key] = [
            _choice(kind, {"name": name, **(params or {})}, f"{key}.{name}", reg)
            for name, params in table.items()
        ]
    train = build_params(TrainSettings, raw.get("train", {}), "train")
    evaluation = build_params(EvalSettings, raw.get("eval", {}), "eval")
    return RunConfig(
        seed=seed,
        train=train,
        eval=evaluation,
        raw=raw,
        protocol=protocol,
        **stages,
        **collections,
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return resolve(load_raw(path, overrides))
