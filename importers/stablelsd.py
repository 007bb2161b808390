"""Importer plugin "stablelsd": an official StableLSD or GLASS checkpoint as a run directory.

`ocl-bench import stablelsd CKPT/multiheadstevesa/diffusion_pytorch_model.safetensors --out
RUN_DIR [overrides]`. StableLSD (JindongJiang/latent-slot-diffusion) and GLASS (visinf/glass,
whose released checkpoints are StableLSD's layout) save their trained modules diffusers-style,
one subfolder per class, lowercased: `multiheadstevesa/` holds the slot attention
(`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`); GLASS's stage-2 checkpoints
also hold a fine-tuned `unet2dconditionmodel/` beside it, which is loaded into the decoder's
UNet when present. The run builds from the `stablelsd` preset (DINOv2 and Stable Diffusion
2.1 as their plugins load them: the checkpoint has neither) with the sizes of config.json.

Official layout -> ours (MultiHeadSTEVESA, src/models/slot_attn.py of either repository):

    pos.projection (1x1 conv 4 -> D)      -> grouping.pos_proj (Linear 4 -> D)
    pos.pe                                -> dropped (the cell-centre grid, rebuilt)
    in_layer_norm / in_mlp.{0,2}          -> grouping.pre_mlp.0 / pre_mlp.1.{0,2}
    slot_mu, slot_log_sigma               -> grouping.mu, log_sigma (Gaussian init)
    slot_mu [1,K,d] (learnable_slot_init) -> grouping.queries [K,d]
    bbox_mlp.{0,2} (GLASS init_mlp)       -> grouping.box_mlp.{0,2} (init='boxes')
    norm_inputs, norm_slots, norm_mlp, gru -> grouping.same names
    project_{q,k,v}                       -> grouping.to_{q,k,v}
    mlp.{0,2}                             -> grouping.update_mlp.{0,2}
    out_layer_norm, out_linear            -> decoder.slot_proj.0, slot_proj.1

`num_heads` of config.json becomes `grouping.num_heads` (multi-head slot attention: the
weights have the same shapes for any head count, only the computation splits them). With
init_mlp the official module also holds the unused Gaussian parameters; they are dropped.
tests/test_official_glass.py imports GLASS's own module, saves it with `save_pretrained` and
checks that this importer's run gives its slots and attention.

Evaluation protocol. A GLASS file names `protocol = "glass"` (protocols/glass.toml: GLASS's
COCO loader geometry and eval_metrics.py), any other `protocol = "stablelsd"` (the preset's:
LSD's input geometry with GLASS's ground truth and scoring). The importer tells GLASS's files
by what only GLASS's code writes: its MultiHeadSTEVESA has an `init_mlp` argument, which
`save_pretrained` records in config.json (it records every argument, defaults included), and
its stage-2 checkpoints hold a fine-tuned `unet2dconditionmodel/` (LSD saves no UNet of that
class). A GLASS file written by code without `init_mlp` cannot be told apart: import it with
`protocol=glass`, or re-score the run with `ocl-bench eval RUN --protocol glass`.
`protocol=NAME` on the command line always wins (`protocol=`: none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import apply_overrides, load_raw, resolve
from ocl_bench.run.data import make_dataset
from ocl_bench.run.importing import (
    CheckpointImporter,
    ImportResult,
    check_keys,
    load_strict,
    name_protocol,
    protocol_note,
    read_state_dict,
    set_unless_overridden,
)

WHAT = "a StableLSD/GLASS slot-attention file (multiheadstevesa/diffusion_pytorch_model.*)"
UNET_FOLDER = "unet2dconditionmodel"
RENAME = {  # official prefix -> ours, tried in order
    "pos.projection.": "grouping.pos_proj.",
    "in_layer_norm.": "grouping.pre_mlp.0.",
    "in_mlp.0.": "grouping.pre_mlp.1.0.",
    "in_mlp.2.": "grouping.pre_mlp.1.2.",
    "project_q.": "grouping.to_q.",
    "project_k.": "grouping.to_k.",
    "project_v.": "grouping.to_v.",
    "mlp.0.": "grouping.update_mlp.0.",
    "mlp.2.": "grouping.update_mlp.2.",
    "bbox_mlp.": "grouping.box_mlp.",
    "norm_inputs.": "grouping.norm_inputs.",
    "norm_slots.": "grouping.norm_slots.",
    "norm_mlp.": "grouping.norm_mlp.",
    "gru.": "grouping.gru.",
    "out_layer_norm.": "decoder.slot_proj.0.",
    "out_linear.": "decoder.slot_proj.1.",
}


@dataclass(frozen=True)
class StableLSDImporterParams:
    unet: bool = param(
        True,
        "load a fine-tuned UNet from ../unet2dconditionmodel/ when the checkpoint has one "
        "(GLASS stage 2); false keeps the decoder's pretrained UNet",
    )


@dataclass(frozen=True)
class StableLSDLayout:
    num_slots: int
    slot_dim: int
    input_dim: int
    out_dim: int
    iterations: int
    init: str
    truncation: str
    resolution: int
    unet: str  # the fine-tuned UNet file loaded, or ""
    method: str = "stablelsd"  # or "glass": whose code wrote the file (`method_of`)


def read_config(weights: Path) -> dict[str, Any]:
    """The config.json beside the weights file, or a one-line DataError."""
    path = weights.parent / "config.json"
    if not path.is_file():
        raise DataError(f"{weights} has no config.json beside it; expected {WHAT}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    missing = [k for k in ("num_slots", "slot_size", "input_size", "out_size") if k not in config]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a MultiHeadSTEVESA config")
    heads = config.get("num_heads", 1)
    if not isinstance(heads, int) or heads < 1 or int(config["slot_size"]) % heads:
        raise DataError(f"{path}: num_heads={heads!r} must be a positive divisor of slot_size")
    return config


def method_of(config: dict[str, Any], weights: Path) -> str:
    """'glass' for a file GLASS's code wrote (config.json records `init_mlp`, an argument
    only GLASS's MultiHeadSTEVESA has; or a fine-tuned unet2dconditionmodel/ beside it,
    which only GLASS stage 2 saves), else 'stablelsd'."""
    return "glass" if "init_mlp" in config or _unet_file(weights) is not None else "stablelsd"


def layout_of(config: dict[str, Any], unet: str, method: str = "stablelsd") -> StableLSDLayout:
    init = "shared_gaussian"
    if config.get("learnable_slot_init"):
        init = "learned_queries"
    elif config.get("init_mlp"):
        init = "boxes"
    return StableLSDLayout(
        num_slots=int(config["num_slots"]),
        slot_dim=int(config["slot_size"]),
        input_dim=int(config["input_size"]),
        out_dim=int(config["out_size"]),
        iterations=int(config.get("num_iterations", 5)),
        init=init,
        truncation="bi-level" if config.get("bi_level") else "none",
        resolution=int(config.get("input_resolution", 32)),
        unet=unet,
        method=method,
    )


def map_state(state: dict[str, Tensor], layout: StableLSDLayout) -> dict[str, Tensor]:
    """The official MultiHeadSTEVESA tensors under ocl-bench's model keys."""
    out = {}
    for key, value in state.items():
        if key == "pos.pe":
            continue
        if key in ("slot_mu", "slot_log_sigma"):
            if layout.init == "boxes":
                continue  # present but unused with init_mlp
            if layout.init == "learned_queries":
                out["grouping.queries"] = value.reshape(layout.num_slots, layout.slot_dim)
            else:
                out["grouping." + ("mu" if key == "slot_mu" else "log_sigma")] = value
            continue
        prefix = next((p for p in RENAME if key.startswith(p)), None)
        if prefix is None:
            raise DataError(f"unexpected key {key!r} in {WHAT}")
        if key == "pos.projection.weight":
            value = value.reshape(value.shape[0], -1)  # 1x1 conv -> Linear
        out[RENAME[prefix] + key[len(prefix) :]] = value
    return out


def _unet_file(weights: Path) -> Path | None:
    folder = weights.parent.parent / UNET_FOLDER
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


class StableLSDImporter(CheckpointImporter):
    """Official StableLSD / GLASS checkpoints: slot_attention + latent_diffusion's projection."""

    name = "stablelsd"
    Params = StableLSDImporterParams
    # Its default params.
    conformance = {}

    def convert(self, path: Path, overrides: list[str]) -> ImportResult:
        config = read_config(path)
        unet_file = _unet_file(path) if self.params.unet else None
        layout = layout_of(config, str(unet_file or ""), method_of(config, path))
        state = read_state_dict(path, WHAT)
        raw = load_raw("stablelsd")
        name_protocol(raw, layout.method, overrides)
        implied = {
            "grouping.num_slots": layout.num_slots,
            "grouping.slot_dim": layout.slot_dim,
            "grouping.mlp_hidden": int(config.get("mlp_hidden_size", layout.slot_dim)),
            "grouping.iterations": layout.iterations,
            "grouping.eps": float(config.get("epsilon", 1e-8)),
            "grouping.num_heads": int(config.get("num_heads", 1)),
            "grouping.init": layout.init,
            "grouping.truncation": layout.truncation,
            "grouping.position": "cartesian",
            "grouping.pre_mlp": True,
            "decoder.slot_norm": True,
        }
        set_unless_overridden(raw, implied, [])
        raw = apply_overrides(raw, overrides)
        cfg = resolve(raw)
        image_size = make_dataset(cfg.dataset, cfg.eval.split).image_size
        model = build_model(cfg, image_size)
        mapped = map_state(state, layout)
        notes = [
            "DINOv2 and the VAE are not in the checkpoint: their plugins load them",
            "written by GLASS's code (init_mlp in config.json or a fine-tuned UNet beside it)"
            if layout.method == "glass"
            else "taken as StableLSD's (no init_mlp in config.json, no fine-tuned UNet); a "
            "GLASS file of older code: protocol=glass scores it as GLASS does",
            protocol_note(cfg, raw.get("protocol", "")),
        ]
        if unet_file is not None:
            unet = read_state_dict(unet_file, "a diffusers UNet2DConditionModel state_dict")
            mapped.update({f"decoder.unet.{k}": v for k, v in unet.items()})
            notes.append(f"the fine-tuned UNet of {unet_file}")
        current = model.state_dict()
        owned = [k for k in current if k.startswith(("grouping.", "decoder.slot_proj."))]
        if unet_file is not None:
            owned += [k for k in current if k.startswith("decoder.unet.")]
        report = check_keys(mapped, {k: tuple(current[k].shape) for k in owned})
        if not report.ok:
            raise DataError(f"{path} does not fit the run's model: {report.text()}")
        load_strict(model, {**current, **mapped}, f"the StableLSD/GLASS checkpoint {path}")
        summary = (
            f"StableLSD/GLASS slot attention: {layout.num_slots} slots x {layout.slot_dim}, "
            f"{layout.iterations} iterations, init {layout.init}, projected to {layout.out_dim}"
        )
        return ImportResult(config=cfg, model=model, summary=summary, layout=layout, notes=notes)


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [StableLSDImporter]


__all__ = [
    "StableLSDImporter",
    "StableLSDImporterParams",
    "StableLSDLayout",
    "layout_of",
    "map_state",
    "read_config",
]
