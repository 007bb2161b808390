"""`ocl-bench import stablelsd`: StableLSD / GLASS checkpoints (diffusers-style subfolders).

Checkpoints are written here in the official layout at tiny sizes: MultiHeadSTEVESA's
state_dict keys and config.json as `save_pretrained` writes them (GLASS's
configs/coco/slot_attn/config.json with tiny sizes), and a GLASS stage-2 fine-tuned UNet
beside it. tests/test_official_glass.py does the same with the official module itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ocl_bench.api.contracts import Batch, Features
from ocl_bench.api.errors import DataError
from ocl_bench.cli import main
from ocl_bench.importers.stablelsd import StableLSDImporter
from ocl_bench.run.evaluate import load_run
from ocl_bench.run.importing import make_importer

D, S, K, SIDE, OUT = 32, 16, 3, 4, 32  # DINOv2 stand-in width, slot size, slots, grid, UNet width
TINY = [
    "dataset.name=shapes",
    "dataset.image_size=32",
    "dataset.val_size=4",
    "encoder.random_init=true",
    f"encoder.embed_dim={D}",
    "encoder.depth=1",
    "encoder.num_heads=2",
    f"encoder.image_size={14 * SIDE}",
    "decoder.tiny=true",
    f"decoder.tiny_width={OUT}",
    "decoder.image_size=0",
    "train.device=cpu",
    "train.precision=fp32",
    "eval.num_images=4",
]


def official_state(init_mlp: bool = False, learnable: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under MultiHeadSTEVESA's keys and shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "pos.projection.weight": (D, 4, 1, 1),
        "pos.projection.bias": (D,),
        "pos.pe": (1, 4, SIDE, SIDE),
        "in_layer_norm.weight": (D,),
        "in_layer_norm.bias": (D,),
        "in_mlp.0.weight": (D, D),
        "in_mlp.0.bias": (D,),
        "in_mlp.2.weight": (D, D),
        "in_mlp.2.bias": (D,),
        "slot_mu": (1, K if learnable else 1, S),
        "norm_inputs.weight": (D,),
        "norm_inputs.bias": (D,),
        "norm_slots.weight": (S,),
        "norm_slots.bias": (S,),
        "norm_mlp.weight": (S,),
        "norm_mlp.bias": (S,),
        "project_q.weight": (S, S),
        "project_k.weight": (S, D),
        "project_v.weight": (S, D),
        "gru.weight_ih": (3 * S, S),
        "gru.weight_hh": (3 * S, S),
        "gru.bias_ih": (3 * S,),
        "gru.bias_hh": (3 * S,),
        "mlp.0.weight": (S, S),
        "mlp.0.bias": (S,),
        "mlp.2.weight": (S, S),
        "mlp.2.bias": (S,),
        "out_layer_norm.weight": (S,),
        "out_layer_norm.bias": (S,),
        "out_linear.weight": (OUT, S),
        "out_linear.bias": (OUT,),
    }
    if not learnable:
        shapes["slot_log_sigma"] = (1, 1, S)
    if init_mlp:
        shapes |= {
            "bbox_mlp.0.weight": (2 * S, 4),
            "bbox_mlp.0.bias": (2 * S,),
            "bbox_mlp.2.weight": (S, 2 * S),
            "bbox_mlp.2.bias": (S,),
        }
    return {k: torch.randn(*v, generator=g) for k, v in shapes.items()}


def write_checkpoint(root: Path, state: dict, **config) -> Path:
    """CKPT/multiheadstevesa/{config.json, diffusion_pytorch_model.safetensors}."""
    folder = root / "multiheadstevesa"
    folder.mkdir(parents=True)
    settings = {
        "_class_name": "MultiHeadSTEVESA",
        "num_iterations": 3,
        "num_slots": K,
        "num_heads": 1,
        "input_size": D,
        "out_size": OUT,
        "slot_size": S,
        "mlp_hidden_size": S,
        "input_resolution": SIDE,
        "epsilon": 1e-6,
        "learnable_slot_init": False,
        "bi_level": False,
    } | config
    (folder / "config.json").write_text(json.dumps(settings))
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        folder / "diffusion_pytorch_model.safetensors",
    )
    return folder / "diffusion_pytorch_model.safetensors"


def test_glass_bbox_checkpoint_imports_through_the_cli(tmp_path) -> None:
    state = official_state(init_mlp=True)
    weights = write_checkpoint(tmp_path / "ckpt", state, init_mlp=True)
    out = tmp_path / "run"
    assert main(["import", "stablelsd", str(weights), "--out", str(out), *TINY]) == 0
    cfg, model, step = load_run(out)
    g = cfg.grouping.params
    assert (g.num_slots, g.slot_dim, g.iterations, g.init, g.eps) == (K, S, 3, "boxes", 1e-6)
    assert g.position == "cartesian" and g.pre_mlp and step == 0
    grouping = model.grouping.state_dict()
    torch.testing.assert_close(
        grouping["pos_proj.weight"], state["pos.projection.weight"][..., 0, 0]
    )
    torch.testing.assert_close(grouping["box_mlp.2.weight"], state["bbox_mlp.2.weight"])
    torch.testing.assert_close(grouping["update_mlp.0.bias"], state["mlp.0.bias"])
    assert "mu" not in grouping  # the unused Gaussian parameters are dropped
    proj = model.decoder.slot_proj
    torch.testing.assert_close(proj[1].weight, state["out_linear.weight"])
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 32.0]]])
    batch = Batch(images=torch.zeros(1, 3, 32, 32), boxes=boxes)
    slots = model.grouping(
        Features(tokens=torch.randn(1, SIDE * SIDE, D), grid=(SIDE, SIDE)), batch
    )
    # the box in GLASS's 256-px frame: (0, 0, 128, 256), then the padding box (-1, ...)
    expected = model.grouping.box_mlp(
        torch.tensor([[0.0, 0.0, 128.0, 256.0], [-1.0] * 4, [-1.0] * 4])
    )
    torch.testing.assert_close(slots.init[0], expected)


def test_learned_queries_and_a_fine_tuned_unet(tmp_path) -> None:
    state = official_state(learnable=True)
    weights = write_checkpoint(tmp_path / "ckpt", state, learnable_slot_init=True, bi_level=True)
    before = make_importer("stablelsd").convert(weights, TINY)
    assert before.layout.method == "stablelsd"  # no init_mlp, no fine-tuned UNet: LSD's file
    plain = before.model
    unet = {k: v + 1.0 for k, v in plain.decoder.unet.state_dict().items()}  # "fine-tuned"
    (tmp_path / "ckpt" / "unet2dconditionmodel").mkdir()
    save_file(
        unet, tmp_path / "ckpt" / "unet2dconditionmodel" / "diffusion_pytorch_model.safetensors"
    )
    result = make_importer("stablelsd").convert(weights, TINY)
    assert result.layout.method == "glass"  # only GLASS stage 2 saves a fine-tuned UNet
    g = result.config.grouping.params
    assert (g.init, g.truncation) == ("learned_queries", "bi-level")
    torch.testing.assert_close(result.model.grouping.queries, state["slot_mu"][0])
    for key, value in result.model.decoder.unet.state_dict().items():
        torch.testing.assert_close(value, unet[key])
    kept = make_importer("stablelsd", {"unet": False}).convert(weights, TINY).model
    first = next(iter(unet))
    assert not torch.equal(kept.decoder.unet.state_dict()[first], unet[first])


def _on_coco(root: Path) -> list[str]:
    """TINY on a tiny COCO (tests/test_coco_voc.py), where the protocols apply."""
    shapes = ("dataset.name=", "dataset.image_size=", "dataset.val_size=")
    rest = [o for o in TINY if not o.startswith(shapes)]
    return ["dataset.name=coco", f"dataset.root={root}", "dataset.image_size=32", *rest]


@pytest.mark.parametrize(
    ("glass_file", "extra", "protocol", "resize_library"),
    [
        (True, [], "glass", "cv2"),  # init_mlp in config.json: GLASS's code wrote it
        (False, [], "stablelsd", "pil"),  # LSD's: GlobDataset's PIL geometry
        (False, ["protocol=glass"], "glass", "cv2"),  # re-scored as GLASS does
    ],
)
def test_the_run_names_the_protocol_of_the_code_that_wrote_the_file(
    tmp_path, glass_file, extra, protocol, resize_library
) -> None:
    from tests.test_coco_voc import make_coco

    root = make_coco(tmp_path / "coco")
    config = {"init_mlp": False} if glass_file else {}  # save_pretrained records defaults
    weights = write_checkpoint(tmp_path / "ckpt", official_state(), **config)
    out = tmp_path / "run"
    StableLSDImporter(StableLSDImporter.Params()).import_run(
        weights, out, [*_on_coco(root), *extra]
    )
    cfg, _, _ = load_run(out)  # as config.toml records it
    assert cfg.protocol == protocol
    d = cfg.dataset.params
    # both score GLASS's COCO ground truth at 256 px with the background as a segment
    assert (d.mask_size, d.crowd, d.overlap_painting) == (256, "drop", "later_wins")
    assert d.resize_library == resize_library
    task = next(t for t in cfg.tasks if t.name == "object_discovery")
    assert (task.params.mask_size, task.params.background_segment) == (256, True)
    notes = json.loads((out / "import.json").read_text())["notes"]
    assert any(f"protocol '{protocol}'" in n for n in notes)


def test_num_heads_becomes_the_grouping_heads(tmp_path) -> None:
    weights = write_checkpoint(tmp_path / "ckpt", official_state(), num_heads=2)
    result = make_importer("stablelsd").convert(weights, TINY)
    assert result.config.grouping.params.num_heads == 2
    assert result.model.grouping.params.num_heads == 2


def test_wrong_files_are_one_line_errors(tmp_path) -> None:
    weights = write_checkpoint(tmp_path / "a", official_state(), num_heads=3)  # S = 16
    with pytest.raises(DataError, match="num_heads=3 must be a positive divisor of slot_size"):
        StableLSDImporter(StableLSDImporter.Params()).convert(weights, TINY)
    weights = write_checkpoint(tmp_path / "b", official_state())
    (weights.parent / "config.json").unlink()
    with pytest.raises(DataError, match="no config.json beside it"):
        make_importer("stablelsd").convert(weights, TINY)
    weights = write_checkpoint(tmp_path / "c", official_state())
    with pytest.raises(DataError, match="does not fit") as err:  # a wider encoder
        make_importer("stablelsd").convert(weights, [*TINY, "encoder.embed_dim=48"])
    assert "grouping.pos_proj.weight (32, 4) (expected (48, 4))" in str(err.value)
