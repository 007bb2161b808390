"""Importer plugin "mage": an official MAGE checkpoint (LTH14/mage) as a run directory.

`ocl-bench import mage PATH --out RUN_DIR [overrides]` reads a MAGE ViT-B or ViT-L
pretraining checkpoint (`torch.load(f)["model"]`; 433 keys for ViT-B: 265 MAGE + 168
`vqgan.*`, ../shared/reference/spot-and-mage.md section j), infers every size from the
tensor shapes, and writes a run of `mage_vitb16` (masked pass on) + `slot_attention` +
`mage` decoder whose weights are the file's:

    vqgan.*                                   -> encoder.tokenizer.*  (the vqgan plugin)
    token_emb.*, blocks.i.*, norm.*           -> encoder.*
    decoder_embed.*, decoder_pos_embed_learned, decoder_blocks.i.*, decoder_norm.*,
    mlm_layer.*                               -> decoder.*
    cls_token, pos_embed, patch_embed.*, mask_token, decoder_pos_embed, decoder_pred.*
                                              -> ignored: MAGE keeps them but never uses
                                                 them (the sin-cos tables, the patch
                                                 path and the pixel head); import.json
                                                 lists them

The slot attention and the decoder's `slot_proj` are not in a MAGE file: they keep
their initialisation (the thesis trains them in stage 2); import.json says so. The run
config sets the tokenizer and encoder to random_init with the file's sizes, so the run
directory is complete on its own (its checkpoint holds every weight: ~800 MB for ViT-B).

`importer.reference=true` copies none of the file's weights: the run config points the
encoder (and its tokenizer) and the decoder at the file by absolute path and sha256
(`encoder.checkpoint`, `encoder.checkpoint_sha256`, `decoder.pretrained`, ...), and the
checkpoint stores the parameter hashes of the modules read from it (encoder,
decoder_embed, decoder_blocks, decoder_norm, mlm_layer), as a run stores its frozen
modules. It holds only the slot attention, `slot_proj`, `decoder_pos_embed_learned` and
buffers. Loading the run reads the file again and fails in one line naming it if it
moved or its bytes changed.

Evaluation protocol: the run names `protocol = "mage"` (protocols/mage.toml: the thesis's
COCO evaluation, SPOT's at MAGE's 256-px input), applied when its dataset is COCO;
`protocol=NAME` on the command line names another (`protocol=`: none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ocl_bench.api.errors import DataError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.params import param
from ocl_bench.decoders.mage import DECODER_PREFIXES
from ocl_bench.encoders.mage import ENCODER_PREFIXES, NUM_CLASS_IDS
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import apply_overrides, load_raw, resolve
from ocl_bench.run.data import make_dataset
from ocl_bench.run.importing import (
    CheckpointImporter,
    ImportResult,
    dim_of,
    file_sha256,
    indices_under,
    load_strict,
    name_protocol,
    protocol_note,
    read_state_dict,
)

LAYOUT_NAME = "an official MAGE checkpoint (LTH14/mage: token_emb.*, blocks.*, decoder_*, vqgan.*)"
TOKENIZER_PREFIX = "vqgan."
# Kept in every MAGE checkpoint, used by none of its forward passes.
UNUSED_KEYS = (
    "cls_token",
    "pos_embed",
    "mask_token",
    "decoder_pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
)
HEADS_BY_WIDTH = {768: 12, 1024: 16}


@dataclass
class MageLayout:
    """What the tensor shapes of a MAGE checkpoint say about the model."""

    dim: int
    depth: int
    decoder_dim: int
    decoder_depth: int
    codebook_size: int
    num_tokens: int
    tokenizer: dict[str, Any]
    ignored: list[str] = field(default_factory=list)


def inspect(state: dict[str, Tensor], path: Path) -> MageLayout:
    """Sizes from the shapes; DataError for keys no MAGE checkpoint has or a codebook that
    does not match the embedding's vocabulary."""
    from ocl_bench.image_tokenizers.vqgan import infer_sizes

    known = ENCODER_PREFIXES + DECODER_PREFIXES + (TOKENIZER_PREFIX,)
    strange = [k for k in state if not k.startswith(known) and k not in UNUSED_KEYS]
    if strange or "token_emb.word_embeddings.weight" not in state:
        shown = ", ".join(strange[:8]) or "no token_emb.word_embeddings.weight"
        raise DataError(f"{path} is not {LAYOUT_NAME}: unexpected keys ({len(strange)}): {shown}")
    vqgan = {
        k[len(TOKENIZER_PREFIX) :]: v for k, v in state.items() if k.startswith(TOKENIZER_PREFIX)
    }
    if not vqgan:
        raise DataError(f"{path} has no vqgan.* keys: not a MAGE checkpoint with its tokenizer")
    tokenizer = infer_sizes(vqgan, f"{path} (vqgan.*)")
    vocab, dim = state["token_emb.word_embeddings.weight"].shape
    codebook = int(tokenizer["n_embed"])
    if vocab != codebook + NUM_CLASS_IDS + 1:
        raise DataError(
            f"vocabulary mismatch in {path}: token_emb embeds {vocab} ids but the vqgan "
            f"codebook has {codebook} entries (MAGE: codebook + {NUM_CLASS_IDS} classes + 1)"
        )
    positions = dim_of(state, "token_emb.position_embeddings.weight", 0) or 0
    return MageLayout(
        dim=int(dim),
        depth=len(indices_under(state, "blocks.")),
        decoder_dim=dim_of(state, "decoder_embed.weight", 0) or int(dim),
        decoder_depth=len(indices_under(state, "decoder_blocks.")),
        codebook_size=codebook,
        num_tokens=positions - 1,
        tokenizer={**tokenizer, "ch_mult": list(tokenizer["ch_mult"])},
        ignored=[k for k in UNUSED_KEYS if k in state],
    )


# The decoder's modules a MAGE file holds (decoder_pos_embed_learned, a bare parameter of
# 0.8 MB, is copied: a hash covers whole modules).
REFERENCED_DECODER = ("decoder_embed", "decoder_blocks", "decoder_norm", "mlm_layer")


@dataclass(frozen=True)
class Source:
    """The file a referencing run reads its weights from."""

    path: Path
    sha256: str


def _run_config(
    layout: MageLayout, overrides: list[str], num_heads: int, source: Source | None = None
) -> dict[str, Any]:
    side = int(round(layout.num_tokens**0.5))
    if side * side != layout.num_tokens or side < 1:
        raise DataError(f"the checkpoint embeds {layout.num_tokens} positions: not a square grid")
    downsample = 2 ** (len(layout.tokenizer["ch_mult"]) - 1)
    heads = num_heads or HEADS_BY_WIDTH.get(layout.dim, 0)
    if not heads:
        raise DataError(
            f"width {layout.dim} is neither MAGE ViT-B (768) nor ViT-L (1024): pass "
            "importer.num_heads=H"
        )
    raw = load_raw(None)
    name_protocol(raw, "mage", overrides)
    raw["encoder"] = {
        "name": "mage_vitb16",
        "random_init": True,  # the weights come from the file
        "embed_dim": layout.dim,
        "depth": layout.depth,
        "num_heads": heads,
        "image_size": side * downsample,
        "masking": "mage",
        "tokenizer": {"name": "vqgan", "random_init": True, **layout.tokenizer},
    }
    raw["grouping"] = {"name": "slot_attention", "num_slots": 7}
    raw["decoder"] = {
        "name": "mage",
        "embed_dim": layout.decoder_dim,
        "depth": layout.decoder_depth,
        "num_heads": 16,
    }
    if source is not None:  # the weights are read from the file, pinned by its sha256
        where = {"checkpoint": str(source.path), "checkpoint_sha256": source.sha256}
        del raw["encoder"]["random_init"]
        del raw["encoder"]["tokenizer"]["random_init"]  # the encoder's file: its vqgan.*
        raw["encoder"].update(where)
        raw["decoder"].update(pretrained=True, **where)
    raw["objectives"] = {"token_cross_entropy": {"label_smoothing": 0.1}}
    raw["tasks"] = {"object_discovery": {}}
    return apply_overrides(raw, overrides)


def map_state(model: Any, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The model's full state_dict: the file's tensors where MAGE has them, else the
    model's own (slots, slot_proj), with a note naming those."""
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(TOKENIZER_PREFIX):
            ours["encoder.tokenizer." + key[len(TOKENIZER_PREFIX) :]] = value
        elif key.startswith(ENCODER_PREFIXES):
            ours["encoder." + key] = value
        elif key.startswith(DECODER_PREFIXES):
            ours["decoder." + key] = value
    fresh = sorted(k for k in model.state_dict() if k not in ours)
    fresh_modules = sorted({".".join(k.split(".")[:2]) for k in fresh})
    for key in fresh:
        if not key.startswith(("grouping.", "decoder.slot_proj.")):
            continue  # anything else missing is a damaged file: load_strict reports it
        ours[key] = model.state_dict()[key]
    note = f"not in a MAGE file, initialised fresh: {', '.join(fresh_modules)}" if fresh else ""
    return ours, [note] if note else []


@dataclass(frozen=True)
class MageImporterParams:
    num_heads: int = param(
        0, "encoder attention heads; 0 = from the width (768: 12, ViT-B; 1024: 16, ViT-L)", ge=0
    )
    reference: bool = param(
        False,
        "reference the file by absolute path and sha256 instead of copying its weights into "
        "the run (loading then needs the file, unchanged, at that path)",
        since="0.2",
    )


class MageImporter(CheckpointImporter):
    """Official MAGE ViT-B/L checkpoints (LTH14/mage): mage_vitb16 + slot_attention + mage."""

    name = "mage"
    Params = MageImporterParams
    # Its default params.
    conformance = {}

    def convert(self, path: Path, overrides: list[str]) -> ImportResult:
        state = read_state_dict(path, "MAGE checkpoint")
        layout = inspect(state, path)
        source = Source(path.resolve(), file_sha256(path)) if self.params.reference else None
        raw = _run_config(layout, overrides, self.params.num_heads, source)
        cfg = resolve(raw)
        image_size = make_dataset(cfg.dataset, cfg.eval.split).image_size
        model = build_model(cfg, image_size)
        weights, notes = map_state(model, state)
        notes.append(protocol_note(cfg, raw.get("protocol", "")))
        # by reference the model has read the file already; loading the mapping anyway
        # checks that it holds exactly what the file says
        load_strict(model, weights, f"the MAGE checkpoint {path}")
        referenced = []
        if source is not None:
            referenced = ["encoder", *(f"decoder.{name}" for name in REFERENCED_DECODER)]
            notes.append(
                f"weights referenced, not copied: {source.path} (sha256 {source.sha256}) "
                f"supplies {', '.join(referenced)}"
            )
        if layout.ignored:
            notes.append(f"ignored (unused by MAGE's forward passes): {', '.join(layout.ignored)}")
        size = {768: "ViT-B", 1024: "ViT-L"}.get(layout.dim, f"width {layout.dim}")
        summary = (
            f"MAGE {size} checkpoint: {layout.depth}+{layout.decoder_depth} blocks, codebook "
            f"{layout.codebook_size}, {layout.num_tokens} tokens, {len(layout.ignored)} unused "
            "keys ignored"
        )
        if source is not None:
            summary += f", weights referenced from {source.path}"
        return ImportResult(
            config=cfg,
            model=model,
            summary=summary,
            layout=layout,
            notes=notes,
            referenced=referenced,
        )


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [MageImporter]


__all__ = ["MageImporter", "MageImporterParams", "MageLayout", "inspect", "map_state"]
