"""Building a generated dataset with tiny random models: files, resume, the dataset plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ocl_bench.api.errors import DataError, IncompatiblePluginsError  # noqa: E402
from ocl_bench.datasets import generate  # noqa: E402
from ocl_bench.datasets.generated.captions import Prompt, PromptSource, classes_in  # noqa: E402
from ocl_bench.datasets.generated.dataset import GeneratedDataset, GeneratedParams  # noqa: E402
from ocl_bench.datasets.generated.generate import Recipe, build  # noqa: E402
from ocl_bench.run.config import load_config  # noqa: E402

SOURCE = {"image_size": 32, "train_size": 6, "val_size": 4}
RECIPE = Recipe(source_params=SOURCE, count=3, tiny=True, steps=2, guidance_scale=2.0)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*.*") if p.name != "preview.png")
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen") / "shapes-tiny"
    assert build(root, RECIPE, progress=False) == 3
    return root


def test_items_have_image_mask_and_metadata(built):
    meta = json.loads((built / "meta" / "000001.json").read_text())
    assert meta["seed"] == 1 and meta["model"].startswith("tiny-random")
    assert meta["thresholds"] == {"power": 4, "fg": 0.6, "ignore": 0.5}
    assert meta["prompt"].startswith(meta["caption"]) and meta["classes"]
    # a class word of n characters is an n-token span of the character-level tokenizer
    for word, (a, b) in zip(meta["classes"], meta["token_spans"]):
        assert b - a == len(word)
    image = np.asarray(Image.open(built / "images" / "000001.png"))
    labels = np.asarray(Image.open(built / "masks" / "000001.png"))
    assert image.shape == (32, 32, 3) and labels.shape == (32, 32)
    allowed = {0, 255, *range(1, len(meta["classes"]) + 1)}
    assert set(np.unique(labels).tolist()) <= allowed
    figure = generate.preview(built, 8)  # the 3 finished items
    assert figure == built / "preview.png" and Image.open(figure).size[0] > 100
    assert generate.preview(built.parent / "empty", 2) is None


def test_a_killed_build_resumes_without_touching_finished_items(built, tmp_path, monkeypatch):
    root = tmp_path / "resume"
    real_write = generate.write_item
    calls = []

    def dies_on_second(root_, index, rgb, labels, meta):
        calls.append(index)
        if len(calls) == 2:  # killed after the image of item 1, before its metadata
            generate._atomic(root_ / "images" / f"{index:06d}.png", lambda p: p.write_bytes(b"x"))
            raise KeyboardInterrupt
        real_write(root_, index, rgb, labels, meta)

    monkeypatch.setattr(generate, "write_item", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        build(root, RECIPE, progress=False)
    first = (root / "images" / "000000.png").read_bytes()
    stamp = (root / "meta" / "000000.json").stat().st_mtime_ns
    monkeypatch.setattr(generate, "write_item", real_write)
    assert build(root, RECIPE, progress=False) == 2  # items 1 and 2 only
    assert (root / "images" / "000000.png").read_bytes() == first
    assert (root / "meta" / "000000.json").stat().st_mtime_ns == stamp
    assert _files(root) == _files(built)  # same seeds: same bytes as an uninterrupted build
    with pytest.raises(DataError, match="another recipe"):
        build(root, Recipe(source_params=SOURCE, count=3, tiny=True, steps=3), progress=False)


def test_dataset_plugin_reads_pseudo_masks_and_serves_real_val_images(built):
    params = GeneratedParams(
        root=str(built),
        build=False,
        source_params=SOURCE,
        train_size=3,
        tiny=True,
        steps=2,
        guidance_scale=2.0,
    )
    train = GeneratedDataset(params, "train")
    assert len(train) == 3 and train.image_size == (32, 32)
    sample = train[1]
    labels = torch.from_numpy(np.asarray(Image.open(built / "masks" / "000001.png")).copy())
    assert torch.equal(sample["ignore_mask"], labels == 255)
    present = [k for k in range(1, 6) if (labels == k).any()]
    assert sample["class_masks"].shape[0] == len(present)
    for mask, k in zip(sample["class_masks"], present):
        assert torch.equal(mask, labels == k)
    val = GeneratedDataset(params, "val")
    assert len(val) == 4 and "instance_masks" in val[0]  # the real shapes val split
    batch = train.collate([train[0], train[1]])
    assert batch.class_masks is not None and batch.captions is not None


def test_guidance_on_pseudo_masks_needs_the_generated_dataset():
    guided = ["objectives.glass_guidance.weight=1.0", "grouping.num_slots=3"]
    with pytest.raises(IncompatiblePluginsError, match="batch.generated"):
        from ocl_bench.run.compose import check_compatible

        check_compatible(load_config(None, ["dataset.name=shapes", *guided]))
    check_compatible(load_config(None, ["dataset.name=generated", *guided]))


def test_caption_sources():
    assert classes_in("A red circle and two squares", ["square", "circle"]) == ("circle", "square")
    assert classes_in("a traffic light", ["light", "traffic light"]) == ("traffic light",)
    assert Prompt("a dog", ("dog",)).text == "a dog; dog"
    assert Prompt("", ("dog", "cat")).text == "dog, cat"
    from ocl_bench.datasets.shapes import ShapesDataset

    shapes = ShapesDataset(ShapesDataset.Params(image_size=32, train_size=2), "train")
    labels = shapes[0]["labels"].tolist()
    truth = PromptSource("class_names", shapes)(0)
    assert truth.caption == "" and set(truth.classes) == {shapes.class_names[k] for k in labels}
    own = PromptSource("dataset", shapes)(0)
    assert own.caption == shapes[0]["caption"] and set(own.classes) == set(truth.classes)
    with pytest.raises(DataError, match="OCL_BENCH_BLIP2"):
        PromptSource("blip2", shapes)


def test_stable_diffusion_folder_loads_offline_and_is_recorded(tmp_path, monkeypatch):
    """A diffusers folder (the layout of stabilityai/stable-diffusion-2-1, written here by
    save_pretrained from the tiny stand-ins) through $OCL_BENCH_SD, no network."""
    folder = tmp_path / "sd"
    generate.tiny_pipeline(32, 32, tmp_path / "tok").save_pretrained(folder)
    monkeypatch.setenv("OCL_BENCH_SD", str(folder))
    recipe = Recipe(source_params=SOURCE, count=1, image_size=32, steps=2, guidance_scale=2.0)
    assert build(tmp_path / "out", recipe, progress=False) == 1
    meta = json.loads((tmp_path / "out" / "meta" / "000000.json").read_text())
    assert meta["model"] == str(folder) and meta["image_size"] == 32


def test_generate_dataset_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from ocl_bench.cli import main

    monkeypatch.delenv("OCL_BENCH_SD", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["generate-dataset", str(tmp_path / "g"), "--count", "1", "image_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--pretrained PATH" in err and "--tiny" in err
    args = ["generate-dataset", str(tmp_path / "h"), "--tiny", "--fg-threshold", "0.4"]
    assert main(args) == 2
    assert "thresholds must satisfy" in capsys.readouterr().err
