"""Checkpoint importer plugins (`ocl-bench import FORMAT`) and the generic reading/writing.

SPOT checkpoints are written here in the official key layout at tiny sizes (tests/test_spot.py's
`official_state`) and imported through the command line, as a user would.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.cli import main
from ocl_bench.datasets.segmentation import View, pil_nearest_indices, transform_maps
from ocl_bench.importers.spot import SpotImporter
from ocl_bench.run import checkpoint
from ocl_bench.run.evaluate import load_run
from ocl_bench.run.importing import import_checkpoint, read_state_dict
from ocl_bench.run.registry import registry
from tests.test_coco_voc import make_coco
from tests.test_spot import HEADS, IMAGE, K, official_state, with_tiny_dino, write_official

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["with_tiny_dino"]  # a fixture used below

# Tiny SPOT import: the test encoder, the sizes the shapes do not record, small evaluation.
SPOT_OVERRIDES = [
    "encoder.name=tiny_dino",
    f"grouping.num_slots={K}",
    f"decoder.num_heads={HEADS}",
    "decoder.eval_order=standard",
    "eval.batch_size=4",
    "eval.figure_images=0",
]


def _coco_overrides(root: Path) -> list[str]:
    # no mask size: the imported run's protocol (spot: 320) owns it
    return ["dataset.name=coco", f"dataset.root={root}", f"dataset.image_size={IMAGE}"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ocl-bench: error: ")
    return lines[0]


# ------------------------------------------------------------------ the plugin kind


def test_import_list_shows_spot_from_its_distribution(capsys) -> None:
    assert main(["import", "--list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    spot = [r for r in rows if r and r[0] == "spot"]
    assert spot and spot[0][1] == "ocl-bench"
    info = registry().info("importer", "spot")
    assert info.cls is SpotImporter and info.kind == "importer"


def test_unknown_format_is_one_line_listing_the_known_ones(tmp_path, capsys) -> None:
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    assert main(["import", "slate", str(path), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown checkpoint format 'slate'" in line and "spot" in line
    assert not (tmp_path / "run").exists()


def test_importer_params_are_checked(tmp_path, with_tiny_dino) -> None:
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    with pytest.raises(ConfigError, match=r"importer\.speed.*allowed keys: protocol"):
        import_checkpoint("spot", path, tmp_path / "run", ["importer.speed=2"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ import, then evaluate


def test_spot_checkpoint_imports_and_evaluates_on_coco(tmp_path, with_tiny_dino, capsys) -> None:
    root = make_coco(tmp_path / "coco")
    path = write_official(tmp_path / "checkpoint.pt.tar", official_state(stage=2, seed=3))
    run = tmp_path / "runs" / "spot"
    argv = ["import", "spot", str(path), "--out", str(run), *SPOT_OVERRIDES]
    assert main([*argv, *_coco_overrides(root)]) == 0
    out = capsys.readouterr().out
    assert "SPOT stage-2 checkpoint" in out and f"{K} slots" in out
    cfg, model, step = load_run(run)
    assert step == 0 and cfg.dataset.name == "coco" and cfg.decoder.name == "spot_ar"
    assert cfg.protocol == "spot" and 'protocol = "spot"' in (run / "config.toml").read_text()
    provenance = json.loads((run / "import.json").read_text())
    assert provenance["format"] == "spot" and provenance["layout"]["stage"] == 2
    assert provenance["sha256"] == checkpoint_sha256(path)
    assert main(["eval", str(run), "-q"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    ari = [r for r in metrics["records"] if r["metric"] == "fg_ari" and r["masks"] == "decoder"]
    assert ari and 0.0 <= ari[0]["value"] <= 1.0


def checkpoint_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the method's protocol


@pytest.mark.parametrize(
    ("extra", "protocol", "interpolation", "mask_size"),
    [
        # SPOT's protocol: bilinear (the coco plugin defaults to bicubic), 320-px masks
        ([], "spot", "bilinear", 320),
        # the user names another protocol: OCLF's DINOSAUR evaluation
        (["protocol=dinosaur"], "dinosaur", "bicubic", 320),
        # no protocol: the user's own settings, or the dataset plugin's defaults
        (["protocol=", "dataset.interpolation=bicubic", "dataset.mask_size=24"], "", "bicubic", 24),
        (["importer.protocol=false"], "", "bicubic", 320),
    ],
)
def test_spot_import_names_spot_protocol_unless_overridden(
    tmp_path, with_tiny_dino, extra, protocol, interpolation, mask_size
) -> None:
    root = make_coco(tmp_path / "coco")
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    overrides = [*SPOT_OVERRIDES, *_coco_overrides(root), *extra]
    result = import_checkpoint("spot", path, tmp_path / "run", overrides)
    cfg, _, _ = load_run(tmp_path / "run")  # as config.toml records it
    for c in (result.config, cfg):
        assert c.protocol == protocol
        assert c.dataset.params.interpolation == interpolation
        assert c.dataset.params.mask_size == mask_size
    task = next(t for t in cfg.tasks if t.name == "object_discovery")
    assert task.params.mask_size == (mask_size if protocol else 0)
    if protocol == "spot":  # eval_spot.py scores the foreground only, with class masks
        assert (task.params.background_segment, task.params.class_masks) == (False, True)
        assert cfg.dataset.params.resize_library == "pil"
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert recorded.get("protocol", "") == protocol
    assert any(f"protocol '{protocol}'" in note for note in result.notes) == bool(protocol)


def test_an_override_contradicting_the_protocol_is_refused(tmp_path, with_tiny_dino) -> None:
    root = make_coco(tmp_path / "coco")
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    overrides = [*SPOT_OVERRIDES, *_coco_overrides(root), "dataset.interpolation=bicubic"]
    with pytest.raises(
        ConfigError, match="dataset.interpolation = 'bicubic' contradicts protocol 'spot'"
    ):
        import_checkpoint("spot", path, tmp_path / "run", overrides)
    assert not (tmp_path / "run").exists()


def test_a_dataset_the_protocol_does_not_cover_is_scored_under_none(
    tmp_path, with_tiny_dino
) -> None:
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    overrides = [*SPOT_OVERRIDES, f"dataset.image_size={IMAGE}", "dataset.val_size=4"]
    result = import_checkpoint("spot", path, tmp_path / "run", overrides)
    assert result.config.dataset.name == "shapes" and result.config.protocol == ""
    assert "interpolation" not in result.config.raw["dataset"]
    assert any("protocol 'spot' does not cover dataset 'shapes'" in n for n in result.notes)


# ------------------------------------------------------------------ bad files


def _random_file(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _truncated_torch_file(path: Path) -> Path:
    torch.save({"model": official_state(stage=1)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _pickled_object(path: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "args": Path("x")}, path)
    return path


def _legacy_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"model": [1, 2]}, protocol=2)[:-3])
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_random_file, "first bytes are neither"),
        (lambda p: (p.write_bytes(b""), p)[1], "the file is empty"),
        (_truncated_torch_file, "damaged zip archive"),
        (_pickled_object, "Python objects"),
        (_legacy_pickle, "damaged pickle"),
    ],
)
def test_bad_file_fails_in_one_line_and_writes_nothing(tmp_path, capsys, make, expected) -> None:
    path = make(tmp_path / "spot_coco.pth")
    out = tmp_path / "runs" / "spot"
    code = main(["import", "spot", str(path), "--out", str(out), "grouping.num_slots=7"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and expected in line
    assert "expected a PyTorch checkpoint" in line and "safetensors" in line
    assert "weights_only" not in line  # none of torch's advice to turn safety off
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_a_failure_while_writing_leaves_no_run_behind(tmp_path, with_tiny_dino, monkeypatch):
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    out = tmp_path / "run"
    out.mkdir()  # an empty directory may be the destination

    def broken_save(directory: Path, *args, **kwargs) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "partial").write_text("x")
        raise DataError("disk full")

    monkeypatch.setattr(checkpoint, "save", broken_save)
    overrides = [*SPOT_OVERRIDES, f"dataset.image_size={IMAGE}", "dataset.val_size=4"]
    with pytest.raises(DataError, match="disk full"):
        import_checkpoint("spot", path, out, overrides)
    assert out.is_dir() and not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "spot.pt"]


def test_non_empty_destination_is_refused(tmp_path, with_tiny_dino) -> None:
    path = write_official(tmp_path / "spot.pt", official_state(stage=1))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty directory"):
        import_checkpoint("spot", path, tmp_path / "run", SPOT_OVERRIDES)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ generic reading


def test_read_state_dict_takes_safetensors_and_unwraps_training_checkpoints(tmp_path) -> None:
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    got = read_state_dict(tmp_path / "w.safetensors", "test checkpoint")
    assert set(got) == set(tensors) and torch.equal(got["a.weight"], tensors["a.weight"])
    ddp = {f"module.{k}": v for k, v in tensors.items()}
    torch.save({"state_dict": ddp, "epoch": 3}, tmp_path / "w.pt")
    assert set(read_state_dict(tmp_path / "w.pt", "test checkpoint")) == set(tensors)


def test_read_state_dict_names_what_is_not_a_tensor(tmp_path) -> None:
    torch.save({"epoch": 3, "weights": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(DataError, match=r"1 entries are not tensors \(e\.g\. epoch\)"):
        read_state_dict(tmp_path / "w.pt", "test checkpoint")
    with pytest.raises(DataError, match="test checkpoint not found"):
        read_state_dict(tmp_path / "missing.pt", "test checkpoint")


# ------------------------------------------------------------------ mask resize (PIL's rule)


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(31, 47, 13), (47, 31, 13), (7, 11, 29), (33, 33, 9), (101, 203, 57), (480, 640, 320)],
)
@pytest.mark.parametrize("view", [View(), View(crop="random", fy=0.3, fx=0.8, flip=True)])
def test_mask_resize_equals_pil_nearest(height, width, size, view) -> None:
    rng = np.random.default_rng(height * width)
    # blocky masks, so most output pixels sit near a boundary between values
    blocks = rng.integers(0, 4, size=(3, height // 3 + 1, width // 3 + 1), dtype=np.uint8)
    maps = np.repeat(np.repeat(blocks, 3, axis=1), 3, axis=2)[:, :height, :width]
    ours = transform_maps(torch.from_numpy(np.ascontiguousarray(maps)), size, view).numpy()
    h, w = (size, size * width // height) if height <= width else (size * height // width, size)
    top, left = view.offsets(h, w, size)
    for ours_map, source in zip(ours, maps):
        pil = np.asarray(Image.fromarray(source).resize((w, h), Image.Resampling.NEAREST))
        pil = pil[top : top + size, left : left + size]
        expected = pil[:, ::-1] if view.flip else pil
        np.testing.assert_array_equal(ours_map, expected)


def test_pil_nearest_is_not_torch_nearest_exact() -> None:
    # Why the table comes from PIL: on uint8 masks (what the datasets resized before) torch's
    # nearest-exact reads another source column at one boundary of COCO's 640 -> 426.
    ours = torch.from_numpy(pil_nearest_indices(640, 426))
    ramp = (torch.arange(640) % 256).to(torch.uint8)[None, None, None]
    torch_cols = F.interpolate(ramp, size=(1, 426), mode="nearest-exact")[0, 0, 0].long()
    differ = int((ours % 256 != torch_cols).sum())
    assert 0 < differ < 426 // 10  # a few boundary columns, not a shift


# ------------------------------------------------------------------ MAGE by reference

MAGE_OVERRIDES = [
    "importer.num_heads=2",
    "encoder.tokenizer.norm_groups=4",
    "dataset.image_size=32",
    "dataset.val_size=2",
]


def _mage_run(tmp_path: Path, reference: bool) -> tuple[Path, Path, dict]:
    """(the tiny MAGE file, a run imported from it, the file's tensors)."""
    from tests.test_mage import write_official

    path = tmp_path / "mage-tiny.pth"
    if not path.exists():
        write_official(path)
    run = tmp_path / ("by-reference" if reference else "copied")
    flag = [f"importer.reference={str(reference).lower()}"]
    torch.manual_seed(11)  # the slot attention and slot_proj the file does not hold
    import_checkpoint("mage", path, run, [*MAGE_OVERRIDES, *flag])
    return path, run, read_state_dict(path, "MAGE checkpoint")


def test_mage_import_names_the_mage_protocol_unless_overridden(tmp_path) -> None:
    from tests.test_mage import write_official

    root = make_coco(tmp_path / "coco")
    path = tmp_path / "mage-tiny.pth"
    write_official(path)
    coco = [
        *MAGE_OVERRIDES[:2],
        "dataset.name=coco",
        f"dataset.root={root}",
        "dataset.image_size=32",
    ]
    result = import_checkpoint("mage", path, tmp_path / "run", coco)
    cfg, _, _ = load_run(tmp_path / "run")
    assert result.config.protocol == cfg.protocol == "mage"
    # the thesis's COCO evaluation: SPOT's loader (no overlap painting, 320-px masks)
    assert (cfg.dataset.params.mask_size, cfg.dataset.params.overlap_painting) == (320, "none")
    task = next(t for t in cfg.tasks if t.name == "object_discovery")
    assert (task.params.mask_size, task.params.background_segment) == (320, False)
    assert any("protocol 'mage'" in note for note in result.notes)
    other = import_checkpoint("mage", path, tmp_path / "glass", [*coco, "protocol=glass"])
    assert other.config.protocol == "glass" and other.config.dataset.params.mask_size == 256


def test_mage_import_by_reference_stores_the_files_hash_not_its_weights(tmp_path) -> None:
    path, copied, state = _mage_run(tmp_path, reference=False)
    _, run, _ = _mage_run(tmp_path, reference=True)
    info = json.loads((run / "import.json").read_text())
    assert info["weights"] == "referenced" and info["sha256"] == checkpoint_sha256(path)
    assert "encoder" in info["referenced_modules"]
    config = (run / "config.toml").read_text()
    assert str(path.resolve()) in config and checkpoint_sha256(path) in config
    stored = checkpoint.load_weights(run / "checkpoint" / checkpoint.MODEL_FILE)
    # what the file does not hold, the decoder's position table (a bare parameter) and a
    # buffer; nothing else of the encoder, its tokenizer or the decoder
    assert {k for k in stored if not k.startswith("grouping.")} == {
        "encoder.token_emb.position_ids",
        "decoder.decoder_pos_embed_learned",
        "decoder.slot_proj.weight",
        "decoder.slot_proj.bias",
    }
    frozen = checkpoint.stored_frozen_hashes(run / "checkpoint" / checkpoint.MODEL_FILE)
    assert sorted(frozen) == sorted(info["referenced_modules"])
    copied_weights = checkpoint.load_weights(copied / "checkpoint" / checkpoint.MODEL_FILE)
    assert len(copied_weights) > 3 * len(stored)

    # loaded, it is the copied import, weight for weight, with the file's tensors
    by_reference, copy = load_run(run)[1].state_dict(), load_run(copied)[1].state_dict()
    assert set(by_reference) == set(copy)
    for key, value in copy.items():
        assert torch.equal(by_reference[key], value), key
    assert torch.equal(
        by_reference["encoder.blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"]
    )
    assert torch.equal(by_reference["decoder.mlm_layer.bias"], state["mlm_layer.bias"])
    assert torch.equal(
        by_reference["encoder.tokenizer.decoder.conv_out.weight"],
        state["vqgan.decoder.conv_out.weight"],
    )


def test_mage_run_by_reference_fails_in_one_line_when_the_file_moved_or_changed(
    tmp_path, capsys
) -> None:
    path, run, state = _mage_run(tmp_path, reference=True)
    moved = path.with_name("elsewhere.pth")
    path.rename(moved)
    assert main(["eval", str(run), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"MAGE checkpoint not found: {path.resolve()}" in line and "sha256" in line
    # pointing the run at the moved file works: same bytes, same hash
    cfg, model, _ = load_run(run, [f"encoder.checkpoint={moved}", f"decoder.checkpoint={moved}"])
    assert torch.equal(model.decoder.mlm_layer.bias, state["mlm_layer.bias"])

    changed = dict(state)
    changed["blocks.0.attn.qkv.bias"] = state["blocks.0.attn.qkv.bias"] + 1.0
    torch.save({"model": changed, "epoch": 1599}, path)
    assert main(["eval", str(run), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"MAGE checkpoint {path.resolve()} changed" in line and "sha256" in line
