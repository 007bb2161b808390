"""Checkpoint importers: turn a checkpoint written by another code base into a run directory.

An importer is a plugin (kind "importer", name = the format, e.g. `ocl-bench import FORMAT
PATH --out RUN_DIR`) that subclasses `CheckpointImporter` and implements `convert`: read the
file, infer the sizes its tensor shapes record, build the run config and the model, map the
file's keys onto the model's. Everything that does not depend on the format lives here, so
every importer gets it the same way:

- reading: `read_state_dict` loads with `weights_only=True` (or from safetensors) and fails in
  one line naming the file and what was expected: a random or truncated file never reaches
  the unpickler's multi-line advice, and nothing in the file can run code;
- sizes: `dim_of`, `indices_under` read sizes off the shapes;
- keys: `check_keys` lists missing, unexpected and wrongly shaped keys; `load_strict` loads a
  mapped state_dict into the model with the same report;
- settings: `set_unless_overridden` applies the model settings a file implies wherever the
  user's overrides do not say otherwise; `name_protocol` names the evaluation protocol of
  the method whose weights are imported (protocols/<name>.toml owns the dataset and task
  settings it is scored with), unless an override names another (`protocol=NAME`, or
  `protocol=` for none), and `protocol_note` says which one the run is scored under;
- writing: `CheckpointImporter.import_run` builds the run directory (config.toml, import.json
  with the provenance, checkpoint/ at step 0) beside its destination and renames it into
  place only when everything succeeded, so a failed import leaves nothing behind. An
  importer may reference the source file instead of copying it (`ImportResult.referenced`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ocl_bench import __version__
from ocl_bench.api.errors import ConfigError, DataError, UnknownPluginError
from ocl_bench.api.params import build_params, to_dict
from ocl_bench.api.plugin import Plugin
from ocl_bench.api.weights import file_sha256
from ocl_bench.run import checkpoint
from ocl_bench.run import config as config_module
from ocl_bench.run.config import STAGES, RunConfig, parse_override

PARAMS_PREFIX = "importer."
EXPECTED_FILE = (
    "expected a PyTorch checkpoint (torch.save: zip or legacy pickle) or a safetensors file "
    "holding a state_dict"
)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # every pickle protocol >= 2 starts with this opcode


@dataclass
class ImportResult:
    """What an importer made of a checkpoint; `import_run` writes it as a run directory.

    `layout` is the importer's record of the sizes it read off the file (a dataclass, written
    to import.json); `summary` is one line for the CLI; `notes` say what was kept, dropped or
    assumed. `referenced` names modules whose weights the run config reads from the source
    file itself (pinned by its sha256): the run's checkpoint stores their parameter hash
    instead of a copy, as it does for frozen modules.
    """

    config: RunConfig
    model: nn.Module
    summary: str
    layout: Any = None
    notes: list[str] = field(default_factory=list)
    referenced: list[str] = field(default_factory=list)


class CheckpointImporter(Plugin):
    """Base of importer plugins: subclasses set `name` (the format), `Params`, and `convert`."""

    kind: ClassVar[str] = "importer"

    def __init__(self, params: Any):
        self.params = params

    def convert(self, path: Path, overrides: list[str]) -> ImportResult:
        """Read `path` and build the config and model it describes (nothing written yet)."""
        raise NotImplementedError

    def import_run(
        self, path: str | Path, out_dir: str | Path, overrides: list[str] | None = None
    ) -> ImportResult:
        """Write `out_dir` as a run directory for the checkpoint at `path` (all or nothing)."""
        path, out_dir = Path(path), Path(out_dir)
        check_out_dir(out_dir)
        overrides = list(overrides or [])
        result = self.convert(path, overrides)
        provenance = {
            "format": self.name,
            "source": str(path.resolve()),
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "importer": {"params": to_dict(self.params), "ocl_bench": __version__},
            "overrides": overrides,
            "layout": _plain(result.layout),
            "notes": result.notes,
            "weights": "referenced" if result.referenced else "copied",
            "referenced_modules": result.referenced,
        }
        write_run(out_dir, result, provenance)
        return result


def _plain(layout: Any) -> Any:
    if dataclasses.is_dataclass(layout) and not isinstance(layout, type):
        return dataclasses.asdict(layout)
    return layout


def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(`importer.KEY=VALUE` values by KEY, the run-config overrides)."""
    values: dict[str, Any] = {}
    rest = []
    for text in overrides:
        if text.strip().startswith(PARAMS_PREFIX):
            parts, value = parse_override(text)
            if len(parts) != 2:
                raise ConfigError(f"override '{text}': importer params are 'importer.KEY=VALUE'")
            values[parts[1]] = value
        else:
            rest.append(text)
    return values, rest


def make_importer(fmt: str, params: dict[str, Any] | None = None) -> CheckpointImporter:
    """The importer plugin for format `fmt` (unknown: one line listing the known formats)."""
    reg = config_module.registry()
    if fmt not in reg.names("importer") and not any(i.broken for i in reg.find(fmt)):
        known = ", ".join(reg.names("importer")) or "(none installed)"
        raise UnknownPluginError(f"unknown checkpoint format '{fmt}'; known formats: {known}")
    cls = reg.get("importer", fmt)
    return cls(build_params(cls.Params, dict(params or {}), PARAMS_PREFIX.rstrip(".")))


def import_checkpoint(
    fmt: str, path: str | Path, out_dir: str | Path, overrides: list[str] | None = None
) -> ImportResult:
    """`ocl-bench import FMT PATH --out OUT_DIR overrides...` (importer.KEY=VALUE: its params)."""
    params, run_overrides = split_overrides(list(overrides or []))
    return make_importer(fmt, params).import_run(path, out_dir, run_overrides)


# ------------------------------------------------------------------ reading


def _file_kind(path: Path) -> str:
    """'empty', 'zip', 'pickle', 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head[0] == PICKLE_PROTO:
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if 0 < header_len <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


def _torch_problem(err: Exception, kind: str) -> str:
    """What torch's error means, without its multi-line advice to disable weights_only."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split(" was not an allowed global")[0].split(". Please use")[0]
        cause = " ".join(text.split("Check the documentation")[0].split())
        if cause.startswith("Unsupported global"):
            return (
                f"it holds Python objects ({cause}) that a weights-only load refuses, since "
                "unpickling them could run code; save plain tensors (a state_dict) instead"
            )
        return f"damaged pickle ({cause})"
    first = " ".join(text.split(". ")[0].split())
    damaged = "damaged zip archive" if kind == "zip" else "damaged pickle"
    return f"{damaged} ({type(err).__name__}{': ' + first if first else ''})"


def read_state_dict(
    path: str | Path, what: str, wrappers: tuple[str, ...] = ("model", "state_dict")
) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, read without running any code from it.

    A dict under one of `wrappers` (training checkpoints keep the model beside the optimizer)
    is unwrapped; DistributedDataParallel's "module." prefix is dropped. Any failure is one
    DataError naming the file, `what` it should be, and what was wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    kind = _file_kind(path)
    problem = f"cannot read {what} {path}: {EXPECTED_FILE}"
    if kind == "empty":
        raise DataError(f"{problem}; the file is empty")
    if kind == "unknown":
        raise DataError(f"{problem}; its first bytes are neither")
    if kind == "safetensors":
        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise DataError(f"{problem}; damaged safetensors file ({err})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad pickles and archives
            raise DataError(f"{problem}; {_torch_problem(err, kind)}") from None
    if isinstance(obj, dict):
        for wrapper in wrappers:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        found = type(obj).__name__ if not isinstance(obj, dict) else "an empty dict"
        raise DataError(f"{path} holds {found}, not a {what} state_dict ({EXPECTED_FILE})")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        under = f" under any of {list(wrappers)}" if wrappers else ""
        raise DataError(
            f"{path} is not a {what} state_dict: {len(not_tensors)} entries are not tensors "
            f"(e.g. {', '.join(not_tensors[:5])}) and no dict of tensors was found{under}"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


# ------------------------------------------------------------------ sizes and keys


def dim_of(state: dict[str, Tensor], key: str, axis: int) -> int | None:
    """Size of `state[key]` along `axis`; None when the key is absent or has fewer axes."""
    value = state.get(key)
    return int(value.shape[axis]) if value is not None and value.dim() > axis else None


def indices_under(state: dict[str, Tensor], prefix: str) -> list[int]:
    """The sorted integers i of keys 'prefix' + 'i.' (blocks, layers)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _listing(label: str, keys: list[str], limit: int = 20) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{label} ({len(keys)}): {', '.join(keys[:limit])}{more}"


@dataclass
class KeyReport:
    """How a state_dict differs from the keys (and shapes) expected of it."""

    missing: list[str]
    unexpected: list[str]
    wrong_shapes: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shapes)

    def text(self) -> str:
        listed = (("missing keys", self.missing), ("unexpected keys", self.unexpected))
        parts = [_listing(label, keys) for label, keys in listed if keys]
        if self.wrong_shapes:
            parts.append(f"wrong shapes: {', '.join(self.wrong_shapes[:10])}")
        return "; ".join(parts)


def check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...] | None]) -> KeyReport:
    """Compare `state` with key -> expected shape (None: any shape)."""
    return KeyReport(
        missing=[k for k in expected if k not in state],
        unexpected=[k for k in state if k not in expected],
        wrong_shapes=[
            f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
            for k in expected
            if k in state and expected[k] is not None and tuple(state[k].shape) != expected[k]
        ],
    )


def require_keys(
    state: dict[str, Tensor], expected: dict[str, tuple[int, ...] | None], layout_name: str
) -> None:
    """DataError listing every missing, unexpected and wrongly shaped key of `state`."""
    report = check_keys(state, expected)
    if not report.ok:
        raise DataError(f"not {layout_name}: {report.text()}")


def load_strict(model: nn.Module, weights: dict[str, Tensor], what: str) -> None:
    """Load `weights` as the complete state_dict of `model`; DataError listing the mismatches."""
    current = model.state_dict()
    report = check_keys(weights, {k: tuple(v.shape) for k, v in current.items()})
    if not report.ok:
        raise DataError(f"{what} does not fit the model built from it: {report.text()}")
    model.load_state_dict(weights, strict=True)


def module_prefixes_holding(module: nn.Module, keys: list[str]) -> list[str]:
    """Prefixes p of submodules such that module.state_dict() has p + every key (p may be '')."""
    have = set(module.state_dict())
    found = []
    for name, _ in module.named_modules():
        prefix = f"{name}." if name else ""
        if all(prefix + k in have for k in keys):
            found.append(prefix)
    return found


# ------------------------------------------------------------------ the run config


def overridden_keys(overrides: list[str]) -> set[str]:
    """The dotted keys the user's overrides set ('dataset.interpolation', ...)."""
    return {".".join(parse_override(text)[0]) for text in overrides}


def set_unless_overridden(
    raw: dict[str, Any], settings: dict[str, Any], overrides: list[str]
) -> dict[str, Any]:
    """Set each dotted key of `settings` in `raw` unless an override set it.

    For a plugin section (dataset, encoder, ...) the key is set only where that section's
    plugin has the param, so an importer can name settings some datasets or encoders do not
    have. Returns the settings applied. (Evaluation settings are the protocol's: see
    `name_protocol`.)
    """
    user = overridden_keys(overrides)
    reg = config_module.registry()
    applied = {}
    for dotted, value in settings.items():
        section, _, key = dotted.partition(".")
        if dotted in user or not key:
            continue
        table = raw.setdefault(section, {})
        if section in STAGES:
            name = table.get("name")
            if name not in reg.names(section):
                continue  # an unknown plugin fails when the config resolves, naming it
            fields = {f.name for f in dataclasses.fields(reg.get(section, name).Params)}
            if key not in fields:
                continue
        table[key] = value
        applied[dotted] = value
    return applied


def name_protocol(raw: dict[str, Any], protocol: str, overrides: list[str]) -> None:
    """Name `protocol` as the run's evaluation protocol unless the user's overrides name one.

    The protocol's dataset and task settings are applied when the config resolves, so an
    importer sets none of them itself; an override that contradicts one is refused there
    (with `protocol=` the run is scored with the config's own settings instead).
    """
    if "protocol" not in overridden_keys(overrides):
        raw["protocol"] = protocol


def protocol_note(cfg: RunConfig, named: str) -> str:
    """One line for import.json and the CLI: the protocol the imported run is scored under
    (`named`: the protocol its config named, which need not cover its dataset)."""
    if cfg.protocol:
        where = cfg.protocol if cfg.protocol.endswith(".toml") else f"protocols/{cfg.protocol}.toml"
        return (
            f"scored under protocol '{cfg.protocol}' ({where}); "
            "`ocl-bench eval RUN --protocol NAME` re-scores it under another"
        )
    if named:
        return (
            f"protocol '{named}' does not cover dataset '{cfg.dataset.name}': scored with "
            "the config's own dataset and task settings"
        )
    return "scored under no protocol (protocol=''): the config's own dataset and task settings"


# ------------------------------------------------------------------ writing


def _holds_run(out_dir: Path) -> bool:
    return (out_dir / "config.toml").exists() or (out_dir / "checkpoint").exists()


def check_out_dir(out_dir: Path) -> None:
    """The destination must not exist yet, or be an empty directory."""
    if not out_dir.exists():
        return
    if _holds_run(out_dir):
        raise DataError(f"{out_dir} already holds a run; choose another --out")
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not an empty directory; choose another --out")


def write_run(out_dir: Path, result: ImportResult, provenance: dict[str, Any]) -> None:
    """config.toml, import.json and checkpoint/ (step 0), built beside and renamed into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.importing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        (staging / "config.toml").write_text(result.config.to_toml())
        (staging / "import.json").write_text(json.dumps(provenance, indent=2, default=str))
        checkpoint.save(
            staging / "checkpoint",
            result.model,
            {"step": 0, "imported_from": provenance["source"], "format": provenance["format"]},
            # modules read from the source file: their hash, checked on load (no copy)
            frozen={
                name: checkpoint.parameter_sha256(result.model.get_submodule(name))
                for name in result.referenced
            },
        )
        check_out_dir(out_dir)  # another process may have taken it meanwhile
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "CheckpointImporter",
    "ImportResult",
    "KeyReport",
    "check_keys",
    "check_out_dir",
    "dim_of",
    "file_sha256",
    "import_checkpoint",
    "indices_under",
    "load_strict",
    "make_importer",
    "module_prefixes_holding",
    "name_protocol",
    "protocol_note",
    "read_state_dict",
    "require_keys",
    "set_unless_overridden",
    "split_overrides",
    "write_run",
]
