"""Conformance suite for ocl-bench plugins: what every plugin of a kind must do, checked the
same way for the built-ins and for a third party's, at a tiny size the plugin declares.

A plugin author calls it from their own pytest file (no pytest plugin, no fixtures of ours):

    import pytest
    from ocl_bench.testing import check_plugin, conformance_cases

    @pytest.mark.parametrize("case", conformance_cases(distribution="my-dist"), ids=str)
    def test_conformance(case, tmp_path):
        check_plugin(case, fixtures=tmp_path)

or checks one class, installed or not: `check_plugin(MyEncoder)`. A failure raises
ConformanceError listing every violated rule, so one run shows all of them.

The tiny run. A plugin's `conformance` (ocl_bench.api.plugin.Plugin) holds dotted config
overrides applied after TINY_BASE (the embedded default run, shrunk: shapes at 32 px, a small
CNN, slot attention and MLP decoder, the reconstruction loss, no task) and after the plugin
itself is put in the run (`<stage>.name`, or the only entry of `objectives` / `tasks`). It
names what else the plugin needs (a decoder that reads token ids names its encoder) and the
plugin's own small sizes. Strings may hold "{fixtures}", the folder the caller passes
(data files a dataset reads); a `ConformanceRun` value becomes the path of an untrained run
directory the suite writes (a teacher, a slot library's run).

What is checked (see check_plugin): params documented and numbers ranged (or declared
unbounded); model parts build, run forward and backward with a finite gradient on each of
their trainable parameters, are deterministic under a seed and round-trip through what a
run checkpoint stores; declared capabilities are present in what the plugin produces;
datasets build their splits and collate into a deterministic Batch; tokenizers encode,
embed and decode with the contract's shapes; tasks report only metrics they declare, with
per-image values exactly when the metric says so; importers build.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, GenerativeDecoder, ModelOutput, Progress, Slots
from ocl_bench.api.errors import UserError
from ocl_bench.api.params import build_params, field_bounds, field_unbounded
from ocl_bench.api.plugin import KINDS, ConformanceRun, ModelPart, Plugin
from ocl_bench.api.runtime import seed_everything, untouched_rng
from ocl_bench.api.tasking import EvalContext, Task, TaskResult
from ocl_bench.api.tokenizing import ImageTokenizer
from ocl_bench.run import checkpoint
from ocl_bench.run.compose import SlotModel, build_model, build_objectives
from ocl_bench.run.config import COLLECTIONS, STAGES, RunConfig, load_raw, resolve
from ocl_bench.run.data import evaluation_dataset, make_dataset
from ocl_bench.run.registry import PluginInfo, Registry, registry, with_kind_base

FIXTURES = "{fixtures}"

# The run every plugin's tiny run starts from: the embedded default (shapes, cnn,
# slot_attention, mlp, reconstruction), shrunk so one forward and backward take milliseconds.
TINY_BASE: dict[str, Any] = {
    "protocol": "",
    "dataset.image_size": 32,
    "dataset.train_size": 8,
    "dataset.val_size": 4,
    "dataset.test_size": 4,
    "encoder.channels": 8,
    "encoder.layers": 2,
    "encoder.patch_size": 4,
    "encoder.dim": 16,
    "grouping.num_slots": 3,
    "grouping.slot_dim": 16,
    "grouping.mlp_hidden": 16,
    "grouping.iterations": 2,
    "decoder.hidden": 16,
    "decoder.layers": 2,
    "objectives": {"reconstruction": {}},
    "tasks": {},
    "train.batch_size": 2,
    "train.warmup_steps": 0,
    "train.device": "cpu",
    "train.precision": "fp32",
    "eval.num_images": 4,
    "eval.batch_size": 2,
    "eval.figure_images": 0,
}

# Capabilities carried in Decoding.extras rather than as a field: the key prefix they use.
EXTRAS_CAPABILITIES = {"decoding.tokenizer_losses": "tokenizer_loss."}

# The checks each kind must have run for a pass to count (a skipped check is a problem, so
# the suite cannot pass vacuously).
_MODEL_CHECKS = ("params", "build", "determinism", "capabilities", "forward/backward", "save/load")
EXPECTED_CHECKS: dict[str, tuple[str, ...]] = {
    "dataset": ("params", "split builds", "collate", "capabilities", "determinism"),
    "tokenizer": (*_MODEL_CHECKS, "tokenizer shapes"),
    "encoder": _MODEL_CHECKS,
    "grouping": _MODEL_CHECKS,
    "decoder": _MODEL_CHECKS,
    "objective": _MODEL_CHECKS,
    "task": ("params", "evaluate", "metrics", "determinism"),
    "importer": ("params", "build"),
}

BUILD_SEED = 0
OTHER_SEED = 1  # the fresh instance a state_dict is loaded into starts elsewhere
FORWARD_SEED = 1234
PERTURB_SEED = 4321


class ConformanceError(AssertionError):
    """A plugin breaks one or more rules; the message lists every one."""

    def __init__(self, report: Report):
        self.report = report
        lines = "\n".join(f"  - {p}" for p in report.problems)
        super().__init__(f"{report.case}: {len(report.problems)} conformance problem(s)\n{lines}")


class FixtureNeeded(UserError):
    """The plugin's tiny run reads files from the fixtures folder and none was given."""


@dataclass(frozen=True)
class Case:
    """One plugin to check: its kind, name and class (what conformance_cases lists). A
    plugin whose module failed to load has no class, and `error` says why: it is listed so
    that a test over a distribution fails instead of silently checking fewer plugins."""

    kind: str
    name: str
    cls: type | None
    distribution: str = ""
    error: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class Report:
    """What check_plugin found: the checks that ran, the problems, what it could not verify."""

    case: str
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, check: str, problem: str) -> None:
        self.problems.append(f"[{check}] {problem}")

    def ran(self, check: str) -> None:
        if check not in self.checks:
            self.checks.append(check)


def conformance_cases(
    kinds: Iterable[str] | None = None,
    distribution: str | None = None,
    reg: Registry | None = None,
) -> list[Case]:
    """Every registered plugin (of `kinds`, from `distribution`), in registry order: what a
    test parametrises over so a failure names its plugin (`ids=str` gives "kind:name").
    Plugins that failed to load are included (kind "?"; check_plugin reports their error)
    unless `kinds` leaves them out."""
    reg = reg or registry()
    wanted = set(kinds) if kinds is not None else {*KINDS, "?"}
    return [
        Case(i.kind, i.name, i.cls, i.distribution, i.error or "")
        for i in reg.infos
        if i.kind in wanted and (distribution is None or i.distribution == distribution)
    ]


# ------------------------------------------------------------------ params


def _numeric(tp: Any) -> bool:
    """An int or float field (or one of them or None), bools excluded."""
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


def check_params(cls: type) -> list[str]:
    """The documentation problems of a plugin class: a one-line summary; every param with a
    doc; every int/float param with a range (param(..., ge/gt/le/lt)) or declared
    `unbounded=True`; a declared `conformance`; a task's metrics each with a doc."""
    problems = []
    if not cls.summary():
        problems.append("the class has no docstring (its first line is the plugin's summary)")
    params = cls.Params
    if not dataclasses.is_dataclass(params):
        return [*problems, f"Params {params!r} is not a dataclass"]
    hints = typing.get_type_hints(params)
    for f in dataclasses.fields(params):
        doc = f.metadata.get("doc")
        if not isinstance(doc, str) or not doc.strip():
            problems.append(f"param '{f.name}' has no doc (declare it with param(default, doc))")
        if _numeric(hints[f.name]) and not field_bounds(f) and not field_unbounded(f):
            problems.append(
                f"numeric param '{f.name}' has no range: give param(..., ge=/gt=/le=/lt=), or"
                " unbounded=True when every value is valid"
            )
    if _declared_conformance(cls) is None:
        problems.append(
            "no `conformance` declaration: set it to the overrides of a tiny run with this"
            " plugin ({} when the suite's tiny base run fits)"
        )
    if issubclass(cls, Task):
        if not cls.metrics:
            problems.append("the task declares no metrics")
        problems += [f"metric '{m.name}' has no doc" for m in cls.metrics if not m.doc.strip()]
    return problems


def _declared_conformance(cls: type) -> dict[str, Any] | None:
    value = getattr(cls, "conformance", None)
    return None if value is None else dict(value)


# ------------------------------------------------------------------ the tiny run


def _apply(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted overrides with Python values, as config.apply_overrides applies its strings
    (switching a stage's plugin drops the previous plugin's params)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"conformance override '{key}': '{part}' is a value, not a table")
            node = nxt
        if len(parts) == 2 and parts[0] in STAGES and parts[1] == "name":
            if node.get("name") not in (None, value):
                node.clear()
        node[parts[-1]] = copy.deepcopy(value)
    return out


def _plugin_itself(kind: str, name: str) -> dict[str, Any]:
    if kind in STAGES:
        return {f"{kind}.name": name}
    for key, collected in COLLECTIONS.items():
        if kind == collected:
            return {key: {name: {}}}
    return {}


_RUNS: dict[str, Path] = {}
_SCRATCH: list[Path] = []


def _scratch() -> Path:
    if not _SCRATCH:
        path = Path(tempfile.mkdtemp(prefix="ocl-bench-conformance-"))
        atexit.register(shutil.rmtree, path, True)
        _SCRATCH.append(path)
    return _SCRATCH[0]


def _substitute(value: Any, fixtures: Path | None, reg: Registry, where: str) -> Any:
    if isinstance(value, ConformanceRun):
        return str(_run_fixture(value, fixtures, reg))
    if isinstance(value, str) and FIXTURES in value:
        if fixtures is None:
            raise FixtureNeeded(
                f"{where} = {value!r} reads the fixtures folder: pass check_plugin(...,"
                " fixtures=PATH) holding the files it names"
            )
        return value.replace(FIXTURES, str(fixtures))
    if isinstance(value, dict):
        return {k: _substitute(v, fixtures, reg, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, fixtures, reg, where) for v in value)
    return value


def _run_fixture(run: ConformanceRun, fixtures: Path | None, reg: Registry) -> Path:
    """The untrained run directory of `run`'s tiny config, written once per process."""
    overrides = _substitute(dict(run.overrides), fixtures, reg, "ConformanceRun")
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:16]
    if digest not in _RUNS:
        path = _scratch() / "runs" / digest
        shutil.rmtree(path, ignore_errors=True)
        write_untrained_run(path, _apply(load_raw(None), {**TINY_BASE, **overrides}), reg)
        _RUNS[digest] = path
    return _RUNS[digest]


def tiny_raw(
    plugin: Case | type,
    fixtures: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    reg: Registry | None = None,
) -> dict[str, Any]:
    """The raw run config of a plugin's tiny run: TINY_BASE, the plugin put in the run, its
    `conformance` declaration, then `overrides` (the caller's)."""
    cls = plugin.cls if isinstance(plugin, Case) else plugin
    reg = reg or _registry_for(cls)
    fixtures = Path(fixtures) if fixtures is not None else None
    declared = _declared_conformance(cls) or {}
    steps = [TINY_BASE, _plugin_itself(cls.kind, cls.name), declared, dict(overrides or {})]
    raw = load_raw(None)
    for step in steps:
        raw = _apply(raw, {k: _substitute(v, fixtures, reg, k) for k, v in step.items()})
    return raw


def tiny_config(
    plugin: Case | type,
    fixtures: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """The resolved RunConfig of a plugin's tiny run (see tiny_raw)."""
    cls = plugin.cls if isinstance(plugin, Case) else plugin
    reg = _registry_for(cls)
    return resolve(tiny_raw(cls, fixtures, overrides, reg), reg)


def write_untrained_run(
    run_dir: str | Path, raw: Mapping[str, Any], reg: Registry | None = None
) -> Path:
    """A run directory (config.toml, checkpoint at step 0) of `raw`'s model as built, not
    trained: what a plugin that reads a trained run (a teacher, a slot library's run) is
    checked against. Built under the run's seed, as load_run rebuilds it."""
    run_dir = Path(run_dir)
    cfg = resolve(dict(raw), reg or registry())
    seed_everything(cfg.seed)
    model = build_model(cfg, make_dataset(cfg.dataset, "train").image_size)
    objectives = build_objectives(cfg, model)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    state = {"step": 0, "objectives": objectives.state_dict()}
    frozen = checkpoint.frozen_hashes(model)
    checkpoint.save(run_dir / "checkpoint", model, state, frozen=frozen)
    return run_dir


def _registry_for(cls: type) -> Registry:
    """The process registry, or a copy of it holding `cls` under its kind and name when
    `cls` is not the class registered there (a plugin checked before it is installed)."""
    reg = registry()
    try:
        if reg.get(cls.kind, cls.name) is cls:
            return reg
    except UserError:
        pass
    infos = [i for i in reg.infos if not (i.kind == cls.kind and i.name == cls.name)]
    infos.append(PluginInfo(cls.kind, cls.name, "(checked class)", "", with_kind_base(cls)))
    return Registry(infos)


# ------------------------------------------------------------------ comparing outputs


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """name -> tensor or plain value, for every leaf of a (nested) output."""
    if isinstance(value, Tensor):
        out[prefix] = value.detach()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(getattr(value, f.name), f"{prefix}.{f.name}", out)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(value[k], f"{prefix}[{k}]", out)
    elif isinstance(value, (list, tuple)) and value:
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value
    return out


def _bits(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and _bits(a) == _bits(b)
        )
    return bool(a == b) or (a != a and b != b)  # NaN equals NaN here


def differences(a: Any, b: Any, name: str = "out") -> list[str]:
    """The leaves (tensors bitwise, other values by ==) in which two outputs differ."""
    fa, fb = _flatten(a, name, {}), _flatten(b, name, {})
    diff = sorted(k for k in set(fa) | set(fb) if k not in fa or k not in fb)
    return diff + sorted(k for k in set(fa) & set(fb) if not _same(fa[k], fb[k]))


def _state(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def _short(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------ model parts


@dataclass
class _Built:
    model: SlotModel
    objectives: nn.ModuleList

    def modules(self) -> list[nn.Module]:
        return [self.model, self.objectives]


def _build(cfg: RunConfig, image_size: tuple[int, int], seed: int) -> _Built:
    seed_everything(seed)
    model = build_model(cfg, image_size)
    return _Built(model, build_objectives(cfg, model))


def _forward(built: _Built, batch: Batch, train: bool) -> tuple[ModelOutput, dict[str, Tensor]]:
    """One step's forward pass as the trainer runs it: progress told, seeded, losses summed
    by the caller."""
    progress = Progress(0, 2)
    for m in (*built.model.modules(), *built.objectives.modules()):
        if isinstance(m, ModelPart):
            m.set_progress(progress)
    built.model.train(train)
    built.objectives.train(train)
    seed_everything(FORWARD_SEED)
    out = built.model(batch)
    losses: dict[str, Tensor] = {}
    for objective in built.objectives:
        losses.update(objective(out, batch, progress))
    return out, losses


def _owned(kind: str, cls: type, built: _Built) -> list[nn.Module]:
    """The modules of the plugin under test in a built run."""
    if kind in ("encoder", "grouping", "decoder"):
        return [getattr(built.model, kind)]
    if kind == "objective":
        return [o for o in built.objectives if isinstance(o, cls)]
    found: list[nn.Module] = []
    for root in built.modules():
        for m in root.modules():
            if isinstance(m, cls) and not any(m is f for f in found):
                found.append(m)
    return found


def _batch(cfg: RunConfig, split: str) -> tuple[Any, Batch]:
    data = make_dataset(cfg.dataset, split)
    count = min(cfg.train.batch_size, len(data))
    return data, data.collate([data[i] for i in range(count)])


def _check_model_part(case: Case, cfg: RunConfig, report: Report, workdir: Path) -> None:
    data, batch = _batch(cfg, "train")
    a = _build(cfg, data.image_size, BUILD_SEED)
    owned_a = _owned(case.kind, case.cls, a)
    if not owned_a:
        report.fail("build", f"the tiny run holds no {case.kind} of class {case.cls.__name__}")
        return
    report.ran("build")

    # determinism: two builds and two forwards under the same seeds agree bitwise
    b = _build(cfg, data.image_size, BUILD_SEED)
    diff = differences(_state(a.modules()), _state(b.modules()), "state")
    if diff:
        report.fail("determinism", f"two builds under seed {BUILD_SEED} differ in {_short(diff)}")
    out_a, losses_a = _forward(a, batch, train=True)
    out_b, losses_b = _forward(b, batch, train=True)
    diff = differences((out_a, losses_a), (out_b, losses_b))
    if diff:
        report.fail("determinism", f"two forwards under one seed differ in {_short(diff)}")
    report.ran("determinism")
    if case.kind == "tokenizer":
        _check_tokenizer(owned_a, _owned(case.kind, case.cls, b), batch, report)
    del b, out_b, losses_b

    _check_provides(case, cfg, a, out_a, losses_a, batch, report)
    _check_backward(case, a, owned_a, losses_a, report)
    del out_a, losses_a
    _check_round_trip(case, cfg, a, data.image_size, batch, report, workdir)


def _check_backward(
    case: Case, built: _Built, owned: list[nn.Module], losses: dict[str, Tensor], report: Report
) -> None:
    check = "forward/backward"
    bad = [k for k, v in losses.items() if v.numel() != 1 or not torch.isfinite(v).all()]
    if bad:
        report.fail(check, f"losses that are not finite scalars: {_short(bad)}")
        return
    trainable = [
        (name, p)
        for i, m in enumerate(owned)
        for name, p in m.named_parameters(prefix=f"{case.kind}{i if len(owned) > 1 else ''}")
        if p.requires_grad
    ]
    report.ran(check)
    if not trainable:
        report.notes.append(f"the {case.kind} has no trainable parameter in its tiny run")
    if not losses:
        if trainable:
            report.fail(check, "the tiny run has no loss, so its trainable parameters never train")
        return
    total = sum(losses.values())
    assert isinstance(total, Tensor)
    if not total.requires_grad:
        if trainable:
            report.fail(check, "the loss does not depend on the plugin's trainable parameters")
        return
    total.backward()
    missing = [n for n, p in trainable if p.grad is None]
    infinite = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    if missing:
        report.fail(check, f"trainable parameters without a gradient: {_short(missing)}")
    if infinite:
        report.fail(check, f"parameters with a non-finite gradient: {_short(infinite)}")


def _perturb(built: _Built) -> None:
    """Move every trainable weight, as a training step would, so a load that keeps the fresh
    instance's own init (or the seed's) shows."""
    g = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for m in built.modules():
            for p in m.parameters():
                if p.requires_grad and p.is_floating_point():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)


def _check_round_trip(
    case: Case,
    cfg: RunConfig,
    a: _Built,
    image_size: tuple[int, int],
    batch: Batch,
    report: Report,
    workdir: Path,
) -> None:
    """Save as a run checkpoint does (frozen modules by hash), load into an instance built
    under another seed whose frozen modules come from their source (here: the first
    build's, since the tiny run initialises them at random), and compare outputs."""
    check = "save/load"
    _perturb(a)
    folder = workdir / "checkpoint"
    frozen = checkpoint.frozen_hashes(a.model)
    checkpoint.save(
        folder, a.model, {"step": 1, "objectives": a.objectives.state_dict()}, frozen=frozen
    )
    c = _build(cfg, image_size, OTHER_SEED)
    with torch.no_grad():
        for name in frozen:
            source = a.model.get_submodule(name)
            target = c.model.get_submodule(name)
            for (_, p_src), (_, p_dst) in zip(
                sorted(source.named_parameters()), sorted(target.named_parameters())
            ):
                p_dst.copy_(p_src)
    try:
        checkpoint.load_into(c.model, folder / checkpoint.MODEL_FILE)
        c.objectives.load_state_dict(
            checkpoint.load_state(folder / checkpoint.STATE_FILE)["objectives"]
        )
    except (UserError, RuntimeError) as err:
        report.fail(check, f"the saved state does not load into a fresh instance: {err}")
        return
    with torch.no_grad():
        expected = _forward(a, batch, train=False)
        got = _forward(c, batch, train=False)
    diff = differences(expected, got)
    if diff:
        report.fail(
            check,
            "a fresh instance loaded with the saved state gives other outputs in"
            f" {_short(diff)} (state kept outside state_dict?)",
        )
    if case.kind == "tokenizer":
        for ta, tc in zip(_owned(case.kind, case.cls, a), _owned(case.kind, case.cls, c)):
            diff = differences(_tokenize(ta, batch.images), _tokenize(tc, batch.images), "tok")
            if diff:
                report.fail(check, f"the loaded tokenizer encodes differently: {_short(diff)}")
    report.ran(check)


def _check_provides(
    case: Case,
    cfg: RunConfig,
    built: _Built,
    out: ModelOutput,
    losses: dict[str, Tensor],
    batch: Batch,
    report: Report,
) -> None:
    check = "capabilities"
    params = _params_of(case, cfg)
    _, provides = case.cls.capabilities(params) if params is not None else (set(), set())
    _check_shapes(case.kind, out, batch.size, report)
    for name in sorted(provides):
        if _produced(name, case.kind, built, out, batch, report) is False:
            report.fail(check, f"declares {name!r} but does not produce it")
    report.ran(check)


def _check_shapes(kind: str, out: ModelOutput, b: int, report: Report) -> None:
    """The stage output of a `kind` plugin has the contract's shapes (and sums to 1)."""
    check = "capabilities"
    f = out.features
    n = f.grid[0] * f.grid[1]
    if kind == "encoder":
        if f.tokens.ndim != 3 or f.tokens.shape[:2] != (b, n):
            report.fail(check, f"tokens {tuple(f.tokens.shape)}, expected [{b}, {n}, D]")
        for name in ("targets", "token_ids", "token_mask"):
            value = getattr(f, name)
            if value is not None and value.shape[:2] != (b, n):
                report.fail(check, f"{name} {tuple(value.shape)}, expected [{b}, {n}, ...]")
    if kind == "grouping":
        s = out.slots
        if s.slots.ndim != 3 or s.slots.shape[0] != b:
            report.fail(check, f"slots {tuple(s.slots.shape)}, expected [{b}, K, D]")
        k = s.slots.shape[1]
        if s.attn.shape != (b, n, k):
            report.fail(check, f"attn {tuple(s.attn.shape)}, expected [{b}, {n}, {k}]")
        elif not torch.allclose(s.attn.sum(-1), torch.ones(()), atol=1e-4):
            report.fail(check, "attn does not sum to 1 over the slots")
    if kind == "decoder" and out.decoding.masks is not None:
        masks = out.decoding.masks
        h, w = out.decoding.mask_grid or f.grid
        k = out.slots.slots.shape[1]
        if masks.shape != (b, h * w, k):
            report.fail(check, f"decoding.masks {tuple(masks.shape)}, expected [{b}, {h * w}, {k}]")
        elif not torch.allclose(masks.sum(-1), torch.ones(()), atol=1e-4):
            report.fail(check, "decoding.masks do not sum to 1 over the slots")


def _produced(
    name: str, kind: str, built: _Built, out: ModelOutput, batch: Batch, report: Report
) -> bool | None:
    """Whether capability `name` is in the output; None (noted) where the suite cannot tell."""
    stage, _, field_name = name.partition(".")
    if stage == "features" and kind == "encoder":
        return name in out.features.available()
    if stage == "slots" and kind == "grouping":
        if field_name not in {x.name for x in dataclasses.fields(Slots)}:
            report.notes.append(f"{name}: not a Slots field, not verified")
            return None
        return getattr(out.slots, field_name) is not None
    if stage == "decoding" and kind == "decoder":
        if name in EXTRAS_CAPABILITIES:
            return any(k.startswith(EXTRAS_CAPABILITIES[name]) for k in out.decoding.extras)
        if field_name in {x.name for x in dataclasses.fields(out.decoding)}:
            return name in out.decoding.available()
        return field_name in out.decoding.extras
    if name == "generation.images" and kind == "decoder":
        return _check_generation(built.model.decoder, out.slots, batch, report)
    report.notes.append(f"{name}: a {stage} capability of a {kind}, not verified")
    return None


def _check_generation(decoder: nn.Module, slots: Slots, batch: Batch, report: Report) -> bool:
    if not isinstance(decoder, GenerativeDecoder):
        return False
    detached = dataclasses.replace(
        slots,
        **{
            f.name: getattr(slots, f.name).detach()
            for f in dataclasses.fields(slots)
            if isinstance(getattr(slots, f.name), Tensor)
        },
    )
    decoder.eval()
    with torch.no_grad():
        images = decoder.generate(detached, steps=2, generator=torch.Generator().manual_seed(0))
    decoder.train()
    b = batch.size
    if images.ndim != 4 or images.shape[:2] != (b, 3):
        report.fail("capabilities", f"generate gave {tuple(images.shape)}, expected [{b}, 3, H, W]")
    elif not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        report.fail("capabilities", "generate gave images outside [0, 1]")
    return True


def _params_of(case: Case, cfg: RunConfig) -> Any:
    if case.kind in STAGES:
        return getattr(cfg, case.kind).params
    for key, kind in COLLECTIONS.items():
        if case.kind == kind:
            return next((c.params for c in getattr(cfg, key) if c.name == case.name), None)
    return None


def _tokenize(tokenizer: nn.Module, images: Tensor) -> dict[str, Tensor]:
    assert isinstance(tokenizer, ImageTokenizer)
    with torch.no_grad():
        ids = tokenizer.encode(images)
        return {"ids": ids, "embed": tokenizer.embed(ids), "decode": tokenizer.decode(ids)}


def _tokenizer_images(tokenizer: ImageTokenizer, images: Tensor) -> Tensor:
    """The batch's images at the nearest size the tokenizer's downsampling divides."""
    step = tokenizer.downsample
    h, w = (max(step, round(s / step) * step) for s in images.shape[-2:])
    if (h, w) == tuple(images.shape[-2:]):
        return images
    return torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear").clamp(0, 1)


def _check_tokenizer(
    owned_a: list[nn.Module], owned_b: list[nn.Module], batch: Batch, report: Report
) -> None:
    check = "tokenizer shapes"
    for ta, tb in zip(owned_a, owned_b):
        assert isinstance(ta, ImageTokenizer)
        images = _tokenizer_images(ta, batch.images)
        b, (h, w) = images.shape[0], ta.grid(tuple(images.shape[-2:]))
        first, second = _tokenize(ta, images), _tokenize(tb, images)
        ids, embedded, decoded = first["ids"], first["embed"], first["decode"]
        if ids.shape != (b, h, w) or ids.dtype != torch.int64:
            report.fail(
                check, f"encode gave {ids.dtype} {tuple(ids.shape)}, expected int64 [{b}, {h}, {w}]"
            )
        elif ids.min() < 0 or ids.max() >= ta.vocab_size:
            report.fail(check, f"ids outside [0, vocab_size={ta.vocab_size})")
        if embedded.ndim != 4 or embedded.shape[0] != b or embedded.shape[-2:] != (h, w):
            report.fail(check, f"embed gave {tuple(embedded.shape)}, expected [{b}, C, {h}, {w}]")
        if decoded.shape != images.shape:
            report.fail(
                check, f"decode gave {tuple(decoded.shape)}, expected {tuple(images.shape)}"
            )
        elif not torch.isfinite(decoded).all() or decoded.min() < 0 or decoded.max() > 1:
            report.fail(check, "decode gave images outside [0, 1]")
        diff = differences(first, second, "tok")
        if diff:
            report.fail("determinism", f"two builds encode differently: {_short(diff)}")
    report.ran(check)


# ------------------------------------------------------------------ datasets


def _read(data: Any) -> tuple[Any, Any]:
    count = min(2, len(data))
    return data, data.collate([data[i] for i in range(count)]) if count else None


def _check_dataset(case: Case, cfg: RunConfig, report: Report) -> None:
    """Each split the run reads (train, the evaluation split), as training reads it
    (`cls(params, split)`) and as evaluation tasks read it (`for_evaluation`): it builds, is
    not empty, collates into a Batch of the contract's shapes, twice the same under a seed;
    each declared "batch.*" capability is yielded by the split in one of the two readings
    (a synthetic dataset's generated split lacks the real masks its evaluation reads)."""
    params = cfg.dataset.params
    _, provides = case.cls.capabilities(params)
    fields = {f.name for f in dataclasses.fields(Batch)}
    for name in sorted(provides):
        if name.partition(".")[0] != "batch" or name.partition(".")[2] not in fields:
            report.notes.append(f"{name}: not a Batch field, not verified")
    readings = {"training": case.cls, "evaluation": case.cls.for_evaluation}
    for split in dict.fromkeys(("train", cfg.eval.split)):
        available: set[str] = set()
        for reading, build in readings.items():
            where = f"split {split!r} as {reading} reads it"
            seed_everything(BUILD_SEED)
            data, batch = _read(build(params, split))
            seed_everything(BUILD_SEED)
            _, again = _read(build(params, split))
            report.ran("split builds")
            if batch is None:
                report.fail("split", f"{where} is empty")
                continue
            if not isinstance(batch, Batch):
                report.fail("collate", f"{where}: collate gave {type(batch).__name__}, not a Batch")
                continue
            report.ran("collate")
            _check_batch(batch, tuple(data.image_size), where, report)
            available |= batch.available()
            diff = differences(batch, again, split)
            if diff:
                report.fail("determinism", f"two builds of {where} differ in {_short(diff)}")
            report.ran("determinism")
        for name in sorted(provides):
            if name.partition(".")[2] in fields and name not in available:
                report.fail("capabilities", f"declares {name!r} but split {split!r} lacks it")
        report.ran("capabilities")


def _check_batch(batch: Batch, image_size: tuple[int, int], where: str, report: Report) -> None:
    b, (h, w) = batch.size, image_size
    images = batch.images
    if images.shape != (b, 3, h, w) or not images.is_floating_point():
        report.fail(
            "collate", f"{where}: images {tuple(images.shape)}, expected [{b}, 3, {h}, {w}]"
        )
    elif images.min() < 0 or images.max() > 1:
        report.fail("collate", f"{where}: images outside [0, 1]")
    for name in ("instance_masks", "class_masks"):
        mask = getattr(batch, name)
        if mask is not None and (mask.dtype != torch.bool or mask.ndim != 4 or len(mask) != b):
            report.fail(
                "collate",
                f"{where}: {name} {mask.dtype} {tuple(mask.shape)}, expected bool [{b}, M, h, w]",
            )
    if batch.ignore_mask is not None and (
        batch.ignore_mask.dtype != torch.bool or batch.ignore_mask.ndim != 3
    ):
        report.fail(
            "collate",
            f"{where}: ignore_mask {batch.ignore_mask.dtype} {tuple(batch.ignore_mask.shape)}",
        )


# ------------------------------------------------------------------ tasks


def _evaluate(case: Case, cfg: RunConfig, workdir: Path) -> TaskResult:
    image_size = make_dataset(cfg.dataset, cfg.eval.split).image_size
    seed_everything(cfg.seed)
    model = build_model(cfg, image_size).eval()
    cache: dict[str, Any] = {}

    def dataset(split: str) -> Any:
        if split not in cache:
            cache[split] = evaluation_dataset(cfg.dataset, split)
        return cache[split]

    ctx = EvalContext(
        model=model,
        dataset=dataset,
        split=cfg.eval.split,
        num_images=cfg.eval.num_images,
        batch_size=cfg.eval.batch_size,
        device=torch.device("cpu"),
        progress=False,
        out_dir=workdir,
    )
    choice = next(c for c in cfg.tasks if c.name == case.name)
    seed_everything(cfg.seed)
    return choice.cls(choice.params).evaluate(ctx)


def _check_task(case: Case, cfg: RunConfig, report: Report, workdir: Path) -> None:
    results = [_evaluate(case, cfg, workdir / f"eval{i}") for i in range(2)]
    result = results[0]
    report.ran("evaluate")
    if not isinstance(result, TaskResult) or not result.records:
        report.fail("metrics", "evaluate returned no TaskResult with records")
        return
    for record in result.records:
        if record.task != case.name:
            report.fail("metrics", f"record {record.key} names task {record.task!r}")
        try:
            metric = case.cls.metric(record.metric)
        except UserError:
            report.fail("metrics", f"metric {record.metric!r} is not among the declared metrics")
            continue
        if metric.per_image and record.per_image is None:
            report.fail("metrics", f"{record.key}: Metric says per_image but none is stored")
        if not metric.per_image and record.per_image is not None:
            report.fail("metrics", f"{record.key}: per_image stored for a metric without it")
        if record.per_image is not None and len(record.per_image) != record.num_images:
            report.fail(
                "metrics",
                f"{record.key}: {len(record.per_image)} per-image values for"
                f" {record.num_images} images",
            )
    missing = [p for p in result.figures if not Path(p).is_file()]
    if missing:
        report.fail("metrics", f"figures listed but not written: {_short(missing)}")
    report.ran("metrics")
    first = [(r.key, r.value, r.per_image) for r in results[0].records]
    second = [(r.key, r.value, r.per_image) for r in results[1].records]
    diff = differences(first, second, "records")
    if diff:
        report.fail("determinism", f"two evaluations under one seed differ in {_short(diff)}")
    report.ran("determinism")


# ------------------------------------------------------------------ entry point


def _case(plugin: Case | type | str, name: str | None) -> Case:
    if isinstance(plugin, Case):
        return plugin
    if isinstance(plugin, str):
        if name is None:
            raise TypeError("check_plugin(kind, name): give the plugin's name too")
        return Case(plugin, name, registry().get(plugin, name))
    if not (isinstance(plugin, type) and issubclass(plugin, Plugin)):
        raise TypeError(f"expected a Case, a plugin class or (kind, name), got {plugin!r}")
    return Case(plugin.kind, plugin.name, plugin)


def check_plugin(
    plugin: Case | type | str,
    name: str | None = None,
    *,
    fixtures: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    raise_on_problems: bool = True,
) -> Report:
    """Check one plugin (a Case, a plugin class, or kind and name) in its tiny run.

    fixtures: the folder "{fixtures}" in `conformance` declarations stands for (data files
    a dataset reads); overrides: dotted overrides applied last. Raises ConformanceError
    listing every problem (unless `raise_on_problems` is False); returns the Report, whose
    `checks` name what ran and `notes` what could not be verified.
    """
    case = _case(plugin, name)
    report = Report(str(case))
    if case.cls is None:
        report.fail("load", f"the plugin did not load: {case.error}")
        raise ConformanceError(report)
    started = time.perf_counter()
    report.problems += [f"[params] {p}" for p in check_params(case.cls)]
    report.ran("params")
    workdir = Path(tempfile.mkdtemp(prefix="check-", dir=_scratch()))
    # The checks seed the global generators; the caller's streams are given back untouched.
    try:
        with untouched_rng():
            if case.kind == "importer":
                _check_importer(case, overrides, report)
            else:
                _check_in_run(case, fixtures, overrides, report, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        report.seconds = time.perf_counter() - started
    skipped = [c for c in EXPECTED_CHECKS.get(case.kind, ()) if c not in report.checks]
    if skipped and not report.problems:
        report.fail("suite", f"checks that did not run: {', '.join(skipped)}")
    if report.problems and raise_on_problems:
        raise ConformanceError(report)
    return report


def _check_in_run(
    case: Case,
    fixtures: str | Path | None,
    overrides: Mapping[str, Any] | None,
    report: Report,
    workdir: Path,
) -> None:
    try:
        cfg = tiny_config(case.cls, fixtures, overrides)
    except FixtureNeeded:
        raise
    except UserError as err:
        report.fail("build", f"its tiny run does not resolve: {err}")
        return
    try:
        if case.kind == "dataset":
            _check_dataset(case, cfg, report)
        elif case.kind == "task":
            _check_task(case, cfg, report, workdir)
        else:
            _check_model_part(case, cfg, report, workdir)
    except (UserError, ValueError) as err:
        report.fail("build", f"{type(err).__name__}: {err}")


def _check_importer(case: Case, overrides: Mapping[str, Any] | None, report: Report) -> None:
    declared = {**(_declared_conformance(case.cls) or {}), **dict(overrides or {})}
    values = {k.split(".", 1)[1]: v for k, v in declared.items() if k.startswith("importer.")}
    try:
        importer = case.cls(build_params(case.cls.Params, values, "importer"))
    except (UserError, ValueError, TypeError) as err:
        report.fail("build", f"{type(err).__name__}: {err}")
        return
    if not callable(getattr(importer, "convert", None)):
        report.fail("build", "the importer has no convert(path, overrides)")
    report.ran("build")


__all__ = [
    "EXPECTED_CHECKS",
    "EXTRAS_CAPABILITIES",
    "FIXTURES",
    "TINY_BASE",
    "Case",
    "ConformanceError",
    "ConformanceRun",
    "FixtureNeeded",
    "Report",
    "check_params",
    "check_plugin",
    "conformance_cases",
    "differences",
    "tiny_config",
    "tiny_raw",
    "write_untrained_run",
]
