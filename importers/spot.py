"""Importer plugin "spot": an official SPOT checkpoint (gkakogeorgiou/spot) as a run directory.

`ocl-bench import spot PATH --out RUN_DIR [overrides]` reads a stage-1 or stage-2 checkpoint
in the official key layout (../shared/reference/spot-and-mage.md, "SPOT checkpoint layout"),
infers the sizes from the tensor shapes, maps the keys onto the modules of encoder +
`slot_attention` + `spot_ar`, and writes config.toml, import.json and checkpoint/ (step 0),
which `ocl-bench eval RUN_DIR` evaluates (bench/run/importing.py does the reading and writing).

Official layout (the file is `{"model": state_dict, "optimizer", "epoch", "best_*"}` for
`checkpoint.pt.tar`, or a bare state_dict for `best_model.pt`; legacy `tf_dec.` keys are
renamed to `dec.` as eval_spot.py does):

    slot_attn.layer_norm / mlp.{0,2}            -> grouping.pre_mlp.0 / pre_mlp.1.{0,2}
    slot_attn.slot_mu / slot_log_sigma (stage 1) -> grouping.mu / log_sigma
    slot_attn.slots_init.weight (stage 2)       -> grouping.queries
    slot_attn.slot_attention.{norm_inputs, norm_slots, norm_mlp, gru, mlp.{0,2}}
                                                -> grouping.{same, ..., update_mlp.{0,2}}
    slot_attn.slot_attention.project_{q,k,v}    -> grouping.to_{q,k,v}
    input_proj.*, slot_proj.*, bos_tokens       -> decoder.*
    dec.blocks.i.* / dec.layer_norm.*           -> decoder.blocks.i.* / decoder.layer_norm.*
    dec.blocks.i.self_attn_mask                 -> dropped (checked to be the causal mask)
    encoder.*  (DINO ViT, timm keys)            -> the encoder's input backbone
    second_encoder.* (stage 2: frozen DINO)     -> the encoder's target backbone

Sizes that shapes do not record come from overrides, with SPOT's values as defaults: the
decoder's attention heads (`decoder.num_heads`, official 6), the slot-attention iterations
(`grouping.iterations`, official 3) and, for a stage-1 file, the number of slots
(`grouping.num_slots`, required; Gaussian init has no per-slot tensor).

Evaluation protocol. The run names `protocol = "spot"` (protocols/spot.toml: eval_spot.py's
COCO and VOC evaluation, bilinear PIL resize, 320-px masks, ...), which sets the dataset and
task settings when the config resolves; an override that contradicts one of them is refused.
`protocol=NAME` on the command line names another (`protocol=` or `importer.protocol=false`:
none, the dataset plugins' defaults). The decoder evaluates with all 9 orders
(`decoder.eval_order=all`, SPOT's README numbers).

Encoder weights. The official encoder is DINO ViT-B/16 (`encoder.name`, default
"dino_vitb16", the ViT plugin of encoders/vit.py). Its keys are timm's; they are copied
into the encoder plugin's module whose state_dict holds all of them. An encoder plugin
can say where explicitly with an attribute `spot_backbones = {"encoder": "prefix.",
"second_encoder": "prefix."}`; otherwise the importer takes the backbone whose path has
none of "target", "second", "teacher", "frozen" for `encoder.*` and one whose path has
one of them for `second_encoder.*` (a stage-1 file's `encoder.*` also fills a target
backbone, since stage 1 reconstructs its own frozen features). When the file carries no
encoder weights, the encoder keeps the weights its plugin loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.run import config as config_module
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import apply_overrides, load_raw, resolve
from ocl_bench.run.data import make_dataset
from ocl_bench.run.importing import (
    CheckpointImporter,
    ImportResult,
    dim_of,
    indices_under,
    load_strict,
    make_importer,
    module_prefixes_holding,
    name_protocol,
    protocol_note,
    read_state_dict,
    require_keys,
    set_unless_overridden,
)

LAYOUT_NAME = "an official SPOT checkpoint layout (stage 1 or stage 2)"


# official key after "slot_attn." -> ours after "grouping."
SLOT_ATTENTION_KEYS = {
    "layer_norm.weight": "pre_mlp.0.weight",
    "layer_norm.bias": "pre_mlp.0.bias",
    "mlp.0.weight": "pre_mlp.1.0.weight",
    "mlp.0.bias": "pre_mlp.1.0.bias",
    "mlp.2.weight": "pre_mlp.1.2.weight",
    "mlp.2.bias": "pre_mlp.1.2.bias",
    "slot_mu": "mu",
    "slot_log_sigma": "log_sigma",
    "slots_init.weight": "queries",
    "slot_attention.project_q.weight": "to_q.weight",
    "slot_attention.project_k.weight": "to_k.weight",
    "slot_attention.project_v.weight": "to_v.weight",
    "slot_attention.mlp.0.weight": "update_mlp.0.weight",
    "slot_attention.mlp.0.bias": "update_mlp.0.bias",
    "slot_attention.mlp.2.weight": "update_mlp.2.weight",
    "slot_attention.mlp.2.bias": "update_mlp.2.bias",
}
for _norm in ("norm_inputs", "norm_slots", "norm_mlp"):
    for _p in ("weight", "bias"):
        SLOT_ATTENTION_KEYS[f"slot_attention.{_norm}.{_p}"] = f"{_norm}.{_p}"
for _p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
    SLOT_ATTENTION_KEYS[f"slot_attention.gru.{_p}"] = f"gru.{_p}"

ENCODER_PREFIXES = ("encoder.", "second_encoder.")
TARGET_WORDS = ("target", "second", "teacher", "frozen")
VIT_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


@dataclass
class SpotLayout:
    """What the tensor shapes of an official SPOT checkpoint say about the model."""

    stage: int
    dim: int
    slot_dim: int
    num_slots: int | None
    mlp_hidden: int
    num_layers: int
    ffn_dim: int
    num_orders: int
    num_tokens: int | None
    encoder_depth: int
    has_encoder: bool
    has_second_encoder: bool


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The model state_dict of an official file (unwrapped, legacy keys renamed)."""
    state = {}
    for key, value in read_state_dict(path, "SPOT checkpoint").items():
        if key.startswith("tf_dec."):  # older runs (eval_spot.py renames them the same way)
            key = "dec." + key[len("tf_dec.") :]
        state[key] = value
    return state


def _vit_keys(depth: int) -> list[str]:
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{part}.{p}" for part in VIT_BLOCK_PARTS for p in ("weight", "bias")]
    return keys + ["norm.weight", "norm.bias"]


def inspect(
    state: dict[str, Tensor], num_slots: int | None = None
) -> tuple[SpotLayout, dict[str, tuple[int, ...] | None]]:
    """Infer the sizes and the full expected key -> shape map (None: shape not checked)."""
    q = "slot_attn.slot_attention."
    stage = 2 if "slot_attn.slots_init.weight" in state else 1
    dim = (
        dim_of(state, "input_proj.0.weight", 0)
        or dim_of(state, "dec.layer_norm.weight", 0)
        or dim_of(state, "slot_attn.layer_norm.weight", 0)
        or 0
    )
    slot_dim = dim_of(state, q + "project_q.weight", 0) or dim_of(state, q + "norm_slots.weight", 0)
    slot_dim = slot_dim or 0
    found_k = dim_of(state, "slot_attn.slots_init.weight", 0)
    if found_k is not None and num_slots is not None and num_slots != found_k:
        raise DataError(f"the checkpoint has {found_k} slots, not {num_slots}")
    layers = len(indices_under(state, "dec.blocks.")) or 1
    depth = len(indices_under(state, "encoder.blocks.")) or len(
        indices_under(state, "second_encoder.blocks.")
    )
    layout = SpotLayout(
        stage=stage,
        dim=dim,
        slot_dim=slot_dim,
        num_slots=found_k if found_k is not None else num_slots,
        mlp_hidden=dim_of(state, q + "mlp.0.weight", 0) or 0,
        num_layers=layers,
        ffn_dim=dim_of(state, "dec.blocks.0.ffn.0.weight", 0) or 4 * dim,
        num_orders=dim_of(state, "bos_tokens", 0) or 0,
        num_tokens=dim_of(state, "dec.blocks.0.self_attn_mask", 0),
        encoder_depth=depth,
        has_encoder=any(k.startswith("encoder.") for k in state),
        has_second_encoder=any(k.startswith("second_encoder.") for k in state),
    )
    d, ds, h, f = dim, slot_dim, layout.mlp_hidden, layout.ffn_dim
    n = layout.num_tokens
    shapes: dict[str, tuple[int, ...] | None] = {
        "slot_attn.layer_norm.weight": (d,),
        "slot_attn.layer_norm.bias": (d,),
        "slot_attn.mlp.0.weight": (d, d),
        "slot_attn.mlp.0.bias": (d,),
        "slot_attn.mlp.2.weight": (d, d),
        "slot_attn.mlp.2.bias": (d,),
        q + "project_q.weight": (ds, ds),
        q + "project_k.weight": (ds, d),
        q + "project_v.weight": (ds, d),
        q + "gru.weight_ih": (3 * ds, ds),
        q + "gru.weight_hh": (3 * ds, ds),
        q + "gru.bias_ih": (3 * ds,),
        q + "gru.bias_hh": (3 * ds,),
        q + "mlp.0.weight": (h, ds),
        q + "mlp.0.bias": (h,),
        q + "mlp.2.weight": (ds, h),
        q + "mlp.2.bias": (ds,),
        "input_proj.0.weight": (d, d),
        "input_proj.1.weight": (d,),
        "input_proj.1.bias": (d,),
        "slot_proj.0.weight": (d, ds),
        "slot_proj.1.weight": (d,),
        "slot_proj.1.bias": (d,),
        "bos_tokens": (layout.num_orders, 1, 1, d),
        "dec.layer_norm.weight": (d,),
        "dec.layer_norm.bias": (d,),
    }
    for norm, size in (("norm_inputs", d), ("norm_slots", ds), ("norm_mlp", ds)):
        shapes[f"{q}{norm}.weight"] = shapes[f"{q}{norm}.bias"] = (size,)
    if stage == 2:
        shapes["slot_attn.slots_init.weight"] = (layout.num_slots or 0, ds)
    else:
        shapes["slot_attn.slot_mu"] = shapes["slot_attn.slot_log_sigma"] = (1, 1, ds)
    for i in range(layers):
        b = f"dec.blocks.{i}."
        shapes[b + "self_attn_mask"] = (n, n) if n is not None else None
        for attn in ("self_attn", "encoder_decoder_attn"):
            for p in "qkvo":
                shapes[f"{b}{attn}.proj_{p}.weight"] = (d, d)
        for norm in ("self_attn_layer_norm", "encoder_decoder_attn_layer_norm", "ffn_layer_norm"):
            shapes[f"{b}{norm}.weight"] = shapes[f"{b}{norm}.bias"] = (d,)
        shapes[b + "ffn.0.weight"], shapes[b + "ffn.0.bias"] = (f, d), (f,)
        shapes[b + "ffn.2.weight"], shapes[b + "ffn.2.bias"] = (d, f), (d,)
    for prefix, present in zip(ENCODER_PREFIXES, (layout.has_encoder, layout.has_second_encoder)):
        if present:  # optional, but complete when present
            for key in _vit_keys(depth):
                shapes[prefix + key] = None
            shapes[prefix + "cls_token"] = (1, 1, d)
            if n is not None:
                shapes[prefix + "pos_embed"] = (1, n + 1, d)
    return layout, shapes


def check_layout(state: dict[str, Tensor], shapes: dict[str, tuple[int, ...] | None]) -> None:
    """DataError listing every missing, unexpected and wrongly shaped key."""
    require_keys(state, shapes, LAYOUT_NAME)


def _run_config(layout: SpotLayout, overrides: list[str], protocol: str) -> dict[str, Any]:
    """SPOT's run config for this layout under `protocol`, then the user's overrides."""
    if layout.num_orders not in (1, 9):
        raise DataError(f"bos_tokens has {layout.num_orders} orders; SPOT uses 1 or 9")
    if layout.ffn_dim % layout.dim:
        raise DataError(f"FFN size {layout.ffn_dim} is not a multiple of D={layout.dim}")
    raw = load_raw(None)
    name_protocol(raw, protocol, overrides)
    raw["encoder"] = {"name": "dino_vitb16"}
    raw["grouping"] = {
        "name": "slot_attention",
        "slot_dim": layout.slot_dim,
        "iterations": 3,
        "mlp_hidden": layout.mlp_hidden,
        "init": "learned_queries" if layout.stage == 2 else "shared_gaussian",
        "truncation": "bi-level" if layout.stage == 2 else "none",
        "pre_mlp": True,
    }
    if layout.num_slots is not None:
        raw["grouping"]["num_slots"] = layout.num_slots
    raw["decoder"] = {
        "name": "spot_ar",
        "num_layers": layout.num_layers,
        "num_heads": 6,
        "ffn_multiplier": layout.ffn_dim // layout.dim,
        "orders": "all" if layout.num_orders == 9 else "standard",
        "train_order": "random" if layout.num_orders == 9 else "standard",
        "eval_order": "all",
    }
    raw["objectives"] = {"reconstruction": {}}
    raw["tasks"] = {"object_discovery": {}}
    # SPOT's optimisation settings, for the record (the checkpoint is at step 0 of this run).
    raw["train"] = {
        **raw.get("train", {}),
        "batch_size": 64,
        "lr": 4e-4,
        "weight_decay": 0.0,
        "grad_clip": 0.3,
        "grad_clip_norm": "inf",
    }
    raw = apply_overrides(raw, overrides)
    slots = raw.get("grouping", {}).get("num_slots")
    if layout.num_slots is not None and slots != layout.num_slots:
        raise DataError(f"the checkpoint has {layout.num_slots} slots, not {slots}")
    if slots is None:
        raise DataError(
            "a stage-1 SPOT checkpoint (shared Gaussian init) does not record the number of "
            "slots; pass grouping.num_slots=K (or --num-slots K; official: 7 COCO, 6 VOC, "
            "11 MOVi-C, 24 MOVi-E)"
        )
    return raw


def _encoder_weights(
    encoder: nn.Module, encoder_name: str, state: dict[str, Tensor], layout: SpotLayout
) -> tuple[dict[str, Tensor], list[str]]:
    """Our encoder keys (relative to the encoder) -> the file's tensors, and notes."""
    out: dict[str, Tensor] = {}
    notes: list[str] = []
    if not layout.has_encoder and not layout.has_second_encoder:
        notes.append(f"the file has no encoder weights; encoder '{encoder_name}' keeps its own")
        return out, notes
    keys = _vit_keys(layout.encoder_depth)
    # The final norm is optional: SPOT does not apply it and encoders that skip it
    # (encoder_final_norm=False) may not hold it.
    core = [k for k in keys if not k.startswith("norm.")]
    explicit = getattr(encoder, "spot_backbones", None)
    if explicit:  # {"encoder": prefix, "second_encoder": prefix or None}
        input_prefixes = [explicit["encoder"]] if explicit.get("encoder") is not None else []
        target_prefixes = [explicit[k] for k in ("second_encoder",) if explicit.get(k) is not None]
    else:
        candidates = module_prefixes_holding(encoder, core)
        target_prefixes = [p for p in candidates if any(w in p for w in TARGET_WORDS)][:1]
        input_prefixes = [p for p in candidates if p not in target_prefixes][:1]
    if not input_prefixes:
        raise DataError(
            f"encoder '{encoder_name}' has no ViT with the checkpoint's timm keys (depth "
            f"{layout.encoder_depth}, dim {layout.dim}, e.g. {keys[4]}); use an encoder "
            "plugin that wraps a timm-layout ViT (encoder.name=NAME)"
        )
    if layout.has_second_encoder and not target_prefixes:
        raise DataError(
            "this stage-2 checkpoint has second_encoder.* (the frozen DINO that gives the "
            f"decoder its targets), but encoder '{encoder_name}' has no separate target "
            "backbone; configure the encoder with a frozen target copy"
        )
    # A stage-1 file's encoder also fills a target backbone: stage 1 reconstructs the
    # features of the same frozen encoder.
    plan = [
        ("encoder.", input_prefixes),
        ("second_encoder." if layout.has_second_encoder else "encoder.", target_prefixes),
    ]
    have = set(encoder.state_dict())
    dropped = set()
    for source, prefixes in plan:
        for prefix in prefixes:
            for key in keys:
                if prefix + key in have:
                    out[prefix + key] = state[source + key]
                else:
                    dropped.add(source + key)
    notes.append(
        "encoder weights from the file: "
        + ", ".join(f"{src}* -> encoder.{p or '(root)'}" for src, ps in plan for p in ps)
    )
    if dropped:
        notes.append(f"not used (the encoder has no final norm, as SPOT): {sorted(dropped)}")
    kept = sorted(k for k in have if k not in out)
    if kept:
        notes.append(f"encoder keys not in the file keep the plugin's values: {kept[:10]}")
    return out, notes


def map_state(
    model: nn.Module, state: dict[str, Tensor], layout: SpotLayout, encoder_name: str
) -> tuple[dict[str, Tensor], list[str]]:
    """The full state_dict of `model` filled from an official SPOT state_dict."""
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("slot_attn."):
            ours["grouping." + SLOT_ATTENTION_KEYS[key[len("slot_attn.") :]]] = value
        elif key == "bos_tokens" or key.startswith(("input_proj.", "slot_proj.")):
            ours["decoder." + key] = value
        elif key.startswith("dec."):
            if key.endswith(".self_attn_mask"):
                n = value.shape[0]
                expected = torch.ones(n, n, dtype=torch.bool).triu(1)
                if not torch.equal(value.bool(), expected):
                    raise DataError(f"{key} is not the causal mask SPOT stores")
                continue
            ours["decoder." + key[len("dec.") :]] = value
    encoder_part, notes = _encoder_weights(model.encoder, encoder_name, state, layout)
    ours.update({"encoder." + k: v for k, v in encoder_part.items()})
    for key, value in model.state_dict().items():  # the encoder keeps what the file does not set
        if key.startswith("encoder.") and key not in ours:
            ours[key] = value
    return ours, notes


@dataclass(frozen=True)
class SpotImporterParams:
    protocol: bool = param(
        True,
        "name SPOT's evaluation protocol (protocol='spot': bilinear resize, 320-px masks, ...) "
        "unless an override names one; false = protocol='' (the dataset's defaults)",
    )


class SpotImporter(CheckpointImporter):
    """Official SPOT checkpoints (gkakogeorgiou/spot), stage 1 or 2: slot_attention + spot_ar."""

    name = "spot"
    Params = SpotImporterParams
    # Its default params.
    conformance = {}

    def convert(self, path: Path, overrides: list[str]) -> ImportResult:
        state = read_checkpoint(path)
        layout, shapes = inspect(state)
        check_layout(state, shapes)
        raw = _run_config(layout, overrides, "spot" if self.params.protocol else "")
        layout = replace(layout, num_slots=raw["grouping"]["num_slots"])
        encoder_name = raw["encoder"].get("name")
        reg = config_module.registry()
        if encoder_name not in reg.names("encoder"):
            vit = "vit" in str(encoder_name)
            hint = " (the ViT encoder plugin, encoders/vit.py)" if vit else ""
            raise DataError(
                f"encoder plugin '{encoder_name}'{hint} is not installed, so the SPOT encoder "
                f"(DINO ViT-B/16) cannot be built; installed encoders: "
                f"{', '.join(reg.names('encoder'))}; or pass encoder.name=NAME"
            )
        # Encoder settings SPOT implies, where the plugin has them: weights come from the
        # file (no pretrained file needed), stage 2 fine-tunes blocks 8.. with a frozen copy
        # giving the targets.
        implied: dict[str, Any] = {"encoder.final_norm": False}
        if layout.has_encoder:
            implied["encoder.random_init"] = True
        if layout.has_second_encoder:
            implied["encoder.finetune_from"] = 8
        set_unless_overridden(raw, implied, overrides)
        cfg = resolve(raw)
        notes = [protocol_note(cfg, raw.get("protocol", ""))]
        image_size = make_dataset(cfg.dataset, cfg.eval.split).image_size
        model = build_model(cfg, image_size)
        grid = getattr(model.decoder, "grid", None)
        tokens = layout.num_tokens
        if tokens is not None and grid is not None and grid[0] * grid[1] != tokens:
            raise DataError(
                f"the checkpoint decodes {tokens} tokens, but encoder '{encoder_name}' "
                f"on {image_size[0]}x{image_size[1]} images gives a {grid[0]}x{grid[1]} grid; "
                "set the dataset's image size (SPOT: 224)"
            )
        weights, weight_notes = map_state(model, state, layout, encoder_name)
        load_strict(model, weights, f"the SPOT checkpoint {path}")
        summary = (
            f"SPOT stage-{layout.stage} checkpoint: {layout.num_slots} slots x {layout.slot_dim}, "
            f"D={layout.dim}, {layout.num_layers} decoder blocks, {layout.num_orders} order(s)"
        )
        return ImportResult(
            config=cfg, model=model, summary=summary, layout=layout, notes=notes + weight_notes
        )


def import_spot(
    path: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    encoder: str | None = None,
    num_slots: int | None = None,
    num_heads: int | None = None,
    eval_order: str | None = None,
    protocol: bool = True,
) -> ImportResult:
    """`ocl-bench import spot PATH --out OUT_DIR`, with the keywords as leading overrides."""
    given = {
        "encoder.name": encoder,
        "grouping.num_slots": num_slots,
        "decoder.num_heads": num_heads,
        "decoder.eval_order": eval_order,
    }
    leading = [f"{k}={v}" for k, v in given.items() if v is not None]
    importer = make_importer(SpotImporter.name, {"protocol": protocol})
    return importer.import_run(path, out_dir, [*leading, *(overrides or [])])


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SpotImporter]


__all__ = [
    "SpotImporter",
    "SpotImporterParams",
    "SpotLayout",
    "check_layout",
    "import_spot",
    "inspect",
    "map_state",
    "read_checkpoint",
]
