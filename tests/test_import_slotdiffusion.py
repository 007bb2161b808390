"""`ocl-bench import slotdiffusion`: a released SlotDiffusion model (sa_ldm_*.pth) as a run.

The checkpoint is written here in SADiffusion's key layout at tiny sizes: slot attention
(img_based/models/slot_attention.py + sa_diffusion.py), the LDM UNetModel's flat
input_blocks / middle_block / output_blocks (video_based/models/unet/unet.py), the taming
VQ-VAE under dm_decoder.vae.vqvae, the DDPM schedule buffers and frozen DINO keys. The
official names are listed by hand below (read from those files), so a wrong rename in the
importer fails here; tests/test_official_slotdiffusion.py builds the official UNet itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ocl_bench.api.contracts import Batch, Features
from ocl_bench.api.errors import DataError
from ocl_bench.cli import main
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import apply_overrides, load_raw, resolve
from ocl_bench.run.data import make_dataset
from ocl_bench.run.evaluate import load_run
from ocl_bench.run.importing import import_checkpoint, make_importer

K, D, C = 3, 16, 32  # slots, slot size, DINO stand-in width
TINY = [
    "dataset.name=shapes",
    "dataset.image_size=32",
    "dataset.val_size=4",
    "encoder.random_init=true",
    f"encoder.embed_dim={C}",
    "encoder.depth=1",
    "encoder.num_heads=2",
    "encoder.image_size=32",
    "decoder.head_channels=8",  # not in the shapes (official 32)
    "decoder.unet_norm_groups=8",
    "decoder.vq_norm_groups=8",
    "train.device=cpu",
    "eval.num_images=4",
    "eval.batch_size=4",
]
SIZES = [  # what the importer reads off the shapes; here to build the model the file is from
    f"grouping.num_slots={K}",
    f"grouping.slot_dim={D}",
    "grouping.mlp_hidden=24",
    f"grouping.pre_mlp_out={D}",
    f"grouping.pre_mlp_hidden={D}",
    "grouping.position=linspace",
    "decoder.vqvae=random",
    "decoder.unet_widths=[16, 32]",
    "decoder.unet_attention=[false, true]",
    "decoder.unet_layers=1",
    "decoder.vq_channels=8",
    "decoder.vq_channel_mult=[1, 2]",
    "decoder.vq_layers=1",
    "decoder.vq_codebook_size=16",
]
# official SADiffusion key prefix -> ocl-bench model key prefix
SLOT_ATTENTION = {
    "encoder_pos_embedding.dense.": "grouping.pos_proj.",
    "encoder_out_layer.0.": "grouping.pre_mlp.0.",
    "encoder_out_layer.1.": "grouping.pre_mlp.1.0.",
    "encoder_out_layer.3.": "grouping.pre_mlp.1.2.",
    "slot_attention.norm_inputs.": "grouping.norm_inputs.",
    "slot_attention.project_q.0.": "grouping.norm_slots.",
    "slot_attention.project_q.1.": "grouping.to_q.",
    "slot_attention.project_k.": "grouping.to_k.",
    "slot_attention.project_v.": "grouping.to_v.",
    "slot_attention.gru.": "grouping.gru.",
    "slot_attention.mlp.0.": "grouping.norm_mlp.",
    "slot_attention.mlp.1.": "grouping.update_mlp.0.",
    "slot_attention.mlp.3.": "grouping.update_mlp.2.",
}
# LDM UNetModel(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,)) ->
# diffusers; "R" marks ResBlocks
UNET = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "input_blocks.1.0.": "R down_blocks.0.resnets.0.",
    "input_blocks.2.0.op.": "down_blocks.0.downsamplers.0.conv.",
    "input_blocks.3.0.": "R down_blocks.1.resnets.0.",
    "input_blocks.3.1.": "down_blocks.1.attentions.0.",
    "middle_block.0.": "R mid_block.resnets.0.",
    "middle_block.1.": "mid_block.attentions.0.",
    "middle_block.2.": "R mid_block.resnets.1.",
    "output_blocks.0.0.": "R up_blocks.0.resnets.0.",
    "output_blocks.0.1.": "up_blocks.0.attentions.0.",
    "output_blocks.1.0.": "R up_blocks.0.resnets.1.",
    "output_blocks.1.1.": "up_blocks.0.attentions.1.",
    "output_blocks.1.2.conv.": "up_blocks.0.upsamplers.0.conv.",
    "output_blocks.2.0.": "R up_blocks.1.resnets.0.",
    "output_blocks.3.0.": "R up_blocks.1.resnets.1.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
RESBLOCK = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(ours: str) -> str:
    for official, target in UNET.items():
        resblock = target.startswith("R ")
        target = target.removeprefix("R ")
        if ours.startswith(target):
            rest = ours[len(target) :]
            if resblock:
                inner = next(r for r, d in RESBLOCK.items() if rest.startswith(d))
                rest = inner + rest[len(RESBLOCK[inner]) :]
            return official + rest
    raise KeyError(ours)


def _vqvae_key(ours: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """diffusers VQModel key -> taming's (VQVAE.py / modules.py), 2 levels."""
    if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d)\.resnets\.(\d)\.(.*)", ours):
        part, kind, i, j, rest = m.groups()
        level = int(i) if kind == "down" else 1 - int(i)
        return (
            f"{part}.{kind}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}",
            value,
        )
    if m := re.match(
        r"(encoder|decoder)\.(down|up)_blocks\.(\d)\.(down|up)samplers\.0\.(.*)", ours
    ):
        part, kind, i, which, rest = m.groups()
        level = int(i) if kind == "down" else 1 - int(i)
        return f"{part}.{kind}.{level}.{which}sample.{rest}", value
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", ours):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", value
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", ours):
        name = ATTN[m[2]]
        if name != "norm" and m[3] == "weight":
            value = value[:, :, None, None]  # taming's 1x1 convolutions
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", value
    return ours.replace("conv_norm_out", "norm_out"), value


def _reference_model() -> torch.nn.Module:
    raw = apply_overrides(load_raw("slotdiffusion-coco"), [*TINY, *SIZES])
    return build_model(resolve(raw), (32, 32))


def official_checkpoint(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(SADiffusion-layout state_dict, the model of the same sizes), weights moved off init."""
    torch.manual_seed(seed)
    model = _reference_model()
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value + 0.1 * torch.randn(value.shape, generator=g)  # off 1/0 and the init
        if key == "grouping.queries":
            state["init_latents"] = value[None]
        elif key.startswith("grouping."):
            official = next(o for o, t in SLOT_ATTENTION.items() if key.startswith(t))
            state[official + key[len(SLOT_ATTENTION[official]) :]] = value
        elif key.startswith("decoder.unet."):
            state["dm_decoder.model.diffusion_model." + _unet_key(key[13:])] = value
        elif key.startswith("decoder.vqvae.model."):
            name, value = _vqvae_key(key[20:], value)
            state["dm_decoder.vae.vqvae." + name] = value
    h = w = 4
    r, c = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    state["encoder_pos_embedding.grid"] = torch.stack([r, c, 1 - r, 1 - c], -1)[None]
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    state["dm_decoder.betas"] = betas.float()
    state["dm_decoder.alphas_bar"] = torch.cumprod(1 - betas, 0).float()
    state["encoder.dino.embeddings.cls_token"] = torch.zeros(1, 1, C)  # frozen DINO: dropped
    return state, model


def test_released_layout_imports_through_the_cli_and_loads_every_tensor(tmp_path: Path) -> None:
    state, _ = official_checkpoint()
    path = tmp_path / "sa_ldm_dino_coco_params-res224.pth"
    torch.save({"state_dict": state, "epoch": 100}, path)
    out = tmp_path / "run"
    assert main(["import", "slotdiffusion", str(path), "--out", str(out), *TINY]) == 0
    cfg, model, step = load_run(out)
    g, d = cfg.grouping.params, cfg.decoder.params
    assert (g.num_slots, g.slot_dim, g.mlp_hidden, g.position) == (K, D, 24, "linspace")
    assert (g.pre_mlp_hidden, g.pre_mlp_out, g.init) == (D, D, "learned_queries")
    assert (d.unet_widths, d.unet_attention, d.unet_layers) == ([16, 32], [False, True], 1)
    assert (d.vq_channels, d.vq_channel_mult, d.vq_codebook_size) == (8, [1, 2], 16)
    assert (d.beta_start, d.beta_end, d.vqvae, step) == (0.0015, 0.0195, "imported", 0)
    # DINO sees (x - 0.5) / 0.5, as SlotDiffusion's loaders feed it
    assert cfg.encoder.params.normalize == "half"
    assert cfg.protocol == ""  # the protocol covers COCO and VOC, not these shapes
    ours = model.state_dict()
    torch.testing.assert_close(ours["grouping.queries"], state["init_latents"][0])
    torch.testing.assert_close(
        ours["grouping.norm_slots.weight"], state["slot_attention.project_q.0.weight"]
    )
    torch.testing.assert_close(
        ours["grouping.update_mlp.2.weight"], state["slot_attention.mlp.3.weight"]
    )
    unet = "dm_decoder.model.diffusion_model."
    for official, target in UNET.items():
        target = target.removeprefix("R ")
        for key in [k for k in state if k.startswith(unet + official)]:
            mine = "decoder.unet." + _unet_key_inverse(key[len(unet) :])
            torch.testing.assert_close(ours[mine], state[key])
    vq = state["dm_decoder.vae.vqvae.decoder.mid.attn_1.q.weight"]
    torch.testing.assert_close(
        ours["decoder.vqvae.model.decoder.mid_block.attentions.0.to_q.weight"], vq[:, :, 0, 0]
    )
    up = state["dm_decoder.vae.vqvae.decoder.up.1.block.0.conv1.weight"]  # taming: top level
    torch.testing.assert_close(
        ours["decoder.vqvae.model.decoder.up_blocks.0.resnets.0.conv1.weight"], up
    )
    # the imported modules run: slots from tokens, a denoising prediction from them
    with torch.no_grad():
        slots = model.grouping(Features(tokens=torch.randn(2, 16, C), grid=(4, 4)))
        pred = model.decoder(slots, None, Batch(images=torch.rand(2, 3, 32, 32)))
    assert pred.prediction.shape == (2, 3, 16, 16) and pred.prediction.isfinite().all()


@pytest.mark.parametrize(
    ("extra", "protocol"), [([], "slotdiffusion"), (["importer.protocol=false"], "")]
)
def test_the_run_is_scored_under_the_slotdiffusion_protocol(tmp_path: Path, extra, protocol):
    from tests.test_coco_voc import make_coco

    root = make_coco(tmp_path / "coco")
    state, _ = official_checkpoint()
    path = tmp_path / "sa_ldm_dino_coco_params-res224.pth"
    torch.save(state, path)
    shapes = ("dataset.name=", "dataset.image_size=", "dataset.val_size=")
    coco = ["dataset.name=coco", f"dataset.root={root}", "dataset.image_size=32"]
    overrides = [*coco, *(o for o in TINY if not o.startswith(shapes)), *extra]
    result = import_checkpoint("slotdiffusion", path, tmp_path / "run", overrides)
    cfg, _, _ = load_run(tmp_path / "run")  # as config.toml records it
    assert result.config.protocol == cfg.protocol == protocol
    assert cfg.encoder.params.normalize == "half"
    task = next(t for t in cfg.tasks if t.name == "object_discovery")
    if not protocol:  # the preset's own settings: the coco plugin's 320-px masks
        assert cfg.dataset.params.mask_size == 320
        return
    # test_seg.py: masks at the input size (mask_size 0), cv2 geometry, crowd dropped,
    # overlap pixels ignored, the background not scored
    d = cfg.dataset.params
    assert (d.mask_size, d.resize_library, d.crowd, d.overlaps_ignored) == (0, "cv2", "drop", True)
    assert (task.params.mask_size, task.params.background_segment) == (0, False)
    assert make_dataset(cfg.dataset, cfg.eval.split).mask_size == (32, 32)
    assert any("protocol 'slotdiffusion'" in note for note in result.notes)


def _unet_key_inverse(official: str) -> str:
    for prefix, target in sorted(UNET.items(), key=lambda x: -len(x[0])):
        if official.startswith(prefix):
            resblock = target.startswith("R ")
            rest = official[len(prefix) :]
            if resblock:
                inner = next(r for r in RESBLOCK if rest.startswith(r))
                rest = RESBLOCK[inner] + rest[len(inner) :]
            return target.removeprefix("R ") + rest
    raise KeyError(official)


def test_missing_extra_and_corrupt_files_are_one_line_errors(tmp_path: Path) -> None:
    state, _ = official_checkpoint()
    importer = make_importer("slotdiffusion")
    missing = dict(state)
    del missing["dm_decoder.model.diffusion_model.output_blocks.3.0.in_layers.2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(DataError, match="does not fit") as err:
        importer.convert(tmp_path / "missing.pth", TINY)
    assert "decoder.unet.up_blocks.1.resnets.1.conv1.weight" in str(err.value)
    extra = {**state, "slot_attention.extra.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(DataError, match="unexpected keys .*slot_attention.extra.weight"):
        importer.convert(tmp_path / "extra.pth", TINY)
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read a SlotDiffusion model checkpoint") as err:
        importer.convert(tmp_path / "corrupt.pth", TINY)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="not found"):
        importer.convert(tmp_path / "absent.pth", TINY)
    assert (
        main(
            [
                "import",
                "slotdiffusion",
                str(tmp_path / "absent.pth"),
                "--out",
                str(tmp_path / "r"),
                *TINY,
            ]
        )
        != 0
    )
