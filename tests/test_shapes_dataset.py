"""The embedded `shapes` dataset and the shared collate."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ocl_bench.api.contracts import Batch
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.params import build_params
from ocl_bench.datasets import collate, collate_class_ids
from ocl_bench.datasets.shapes import COLOUR_NAMES, SHAPE_NAMES, ShapesDataset

ROOT = Path(__file__).resolve().parents[1]
P = ShapesDataset.Params
N = 60  # samples checked per property test


def make(split: str = "train", **kw) -> ShapesDataset:
    return ShapesDataset(P(**kw), split)


def digest(sample: dict) -> str:
    h = hashlib.sha256()
    for key in ("image", "instance_masks", "class_masks", "boxes", "labels"):
        h.update(sample[key].contiguous().numpy().tobytes())
    for key in sorted(sample["properties"]):
        h.update(sample["properties"][key].numpy().tobytes())
    h.update(sample["caption"].encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ds() -> ShapesDataset:
    return make("val")


@pytest.fixture(scope="module")
def samples(ds: ShapesDataset) -> list[dict]:
    return [ds[i] for i in range(N)]


# ------------------------------------------------------------------ API and params
def test_plugin_metadata():
    assert ShapesDataset.kind == "dataset" and ShapesDataset.name == "shapes"
    assert ShapesDataset.summary().startswith("Procedural multi-object scenes")
    assert "batch.instance_masks" in ShapesDataset.provides
    assert "batch.captions" in ShapesDataset.provides


def test_hook_returns_class():
    from ocl_bench.datasets import shapes

    assert shapes.ocl_bench_plugins() == [ShapesDataset]


def test_sizes_and_description():
    p = P(train_size=7, val_size=3, test_size=5, shapes=["circle", "star", "cross"])
    assert [len(ShapesDataset(p, s)) for s in ("train", "val", "test")] == [7, 3, 5]
    d = ShapesDataset(p, "train")
    assert d.num_classes == 3
    assert d.image_size == (64, 64)
    specs = d.property_specs()
    assert specs["shape"] == ("categorical", 3)
    assert specs["colour"] == ("categorical", 8)
    assert specs["size"] == specs["x"] == specs["y"] == ("continuous", 1)
    with pytest.raises(IndexError):
        d[7]


def test_bad_split():
    with pytest.raises(ValueError, match="'validation'.*'train', 'val', 'test'"):
        ShapesDataset(P(), "validation")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"shapes": ["square", "hexagon"]}, "hexagon.*allowed: square, circle"),
        ({"shapes": []}, "must not be empty"),
        ({"shapes": ["circle", "circle"]}, "must not repeat"),
        ({"num_colours": 0}, "num_colours"),
        ({"num_colours": len(COLOUR_NAMES) + 1}, "num_colours"),
        ({"min_objects": 4, "max_objects": 3}, "min_objects"),
        ({"min_size": 0.4, "max_size": 0.3}, "min_size"),
        ({"background": "stripes"}, "background"),
    ],
)
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        P(**kw)


def test_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match="hexagon"):
        build_params(P, {"shapes": ["hexagon"]}, "dataset")
    with pytest.raises(ConfigError, match="stripes"):
        build_params(P, {"background": "stripes"}, "dataset")


# ------------------------------------------------------------------ determinism
def test_same_index_is_identical(ds: ShapesDataset):
    a, b = ds[5], ds[5]
    assert digest(a) == digest(b)
    assert torch.equal(a["image"], b["image"])


def test_identical_in_another_process(ds: ShapesDataset):
    code = (
        "from ocl_bench.datasets.shapes import ShapesDataset as D\n"
        "from tests.test_shapes_dataset import digest\n"
        "ds = D(D.Params(), 'val')\n"
        "print(' '.join(digest(ds[i]) for i in (0, 5, 17)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [digest(ds[i]) for i in (0, 5, 17)]


def test_seeds_splits_and_indices_differ(ds: ShapesDataset):
    base = digest(ds[3])
    assert digest(make("val", seed=1)[3]) != base
    assert digest(make("train")[3]) != base
    assert digest(make("test")[3]) != base
    assert digest(ds[4]) != base


# ------------------------------------------------------------------ sample contents
def test_types_and_shapes(samples: list[dict]):
    for i, s in enumerate(samples):
        m = s["labels"].shape[0]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 64, 64)
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["instance_masks"].dtype == torch.bool and s["instance_masks"].shape == (m, 64, 64)
        assert s["class_masks"].dtype == torch.bool
        assert s["class_masks"].shape[0] == s["class_ids"].shape[0]
        assert s["ignore_mask"].shape == (64, 64) and not s["ignore_mask"].any()
        assert s["boxes"].shape == (m, 4) and s["boxes"].dtype == torch.float32
        assert s["labels"].dtype == torch.long
        assert s["index"] == i
        for name, t in s["properties"].items():
            assert t.shape == (m,), name
        assert s["properties"]["shape"].dtype == torch.long
        assert s["properties"]["colour"].dtype == torch.long
        assert s["properties"]["size"].dtype == torch.float32


def test_object_count_range():
    d = make("train", min_objects=3, max_objects=4)
    counts = {d[i]["labels"].numel() for i in range(N)}
    assert counts == {3, 4}
    counts = {s["labels"].numel() for s in (make("train")[i] for i in range(200))}
    assert counts == {2, 3, 4, 5}


def test_masks_nonempty_disjoint_and_cover_with_background(samples: list[dict]):
    for s in samples:
        masks = s["instance_masks"]
        assert masks.flatten(1).any(1).all(), "every instance mask must be non-empty"
        per_pixel = masks.sum(0)
        assert per_pixel.max() <= 1, "visible parts must not overlap"
        background = per_pixel == 0
        assert torch.equal(masks.any(0) | background, torch.ones_like(background))
        assert background.any()


def test_objects_have_their_colour_and_background_differs(samples: list[dict], ds):
    palette = torch.tensor([list(ds._palette[c]) for c in range(8)])
    for s in samples:
        image, masks = s["image"], s["instance_masks"]
        for k, mask in enumerate(masks):
            pixels = image[:, mask]  # [3, n] solid colour
            assert torch.equal(pixels.min(1).values, pixels.max(1).values)
            expected = palette[s["properties"]["colour"][k]]
            ratio = pixels[:, 0] / expected
            assert 0.84 <= float(ratio.min()) and float(ratio.max()) <= 1.0 + 1e-6
        bg = image[:, ~masks.any(0)]
        assert bg.std() > 0  # a gradient with noise, not a flat colour


def test_boxes_match_masks(samples: list[dict]):
    for s in samples:
        for mask, box in zip(s["instance_masks"], s["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            want = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in want]


def test_class_masks_are_union_of_instances(samples: list[dict]):
    for s in samples:
        labels = s["labels"]
        assert s["class_ids"].tolist() == sorted(set(labels.tolist()))
        for cid, cmask in zip(s["class_ids"], s["class_masks"]):
            union = s["instance_masks"][labels == cid].any(0)
            assert torch.equal(cmask, union)
        assert torch.equal(s["class_masks"].any(0), s["instance_masks"].any(0))


def test_property_ranges(samples: list[dict]):
    p = P()
    for s in samples:
        props = s["properties"]
        assert torch.equal(props["shape"], s["labels"])
        assert ((0 <= props["shape"]) & (props["shape"] < 4)).all()
        assert ((0 <= props["colour"]) & (props["colour"] < p.num_colours)).all()
        assert ((p.min_size <= props["size"]) & (props["size"] <= p.max_size)).all()
        for key in ("x", "y"):
            assert ((0 <= props[key]) & (props[key] <= 1)).all()
    # Objects really are as large as documented: at 64 px, at least ~9 px across.
    widths = torch.cat([s["boxes"][:, 2] - s["boxes"][:, 0] for s in samples])
    heights = torch.cat([s["boxes"][:, 3] - s["boxes"][:, 1] for s in samples])
    assert torch.maximum(widths, heights).float().median() >= 12


def test_centres_lie_near_visible_part(samples: list[dict]):
    for s in samples:
        for k, box in enumerate(s["boxes"]):
            x = float(s["properties"]["x"][k]) * 64
            y = float(s["properties"]["y"][k]) * 64
            half = float(s["properties"]["size"][k]) * 64 / 2 * 1.4 + 1
            assert box[0] - half <= x <= box[2] + half
            assert box[1] - half <= y <= box[3] + half


def test_caption_names_every_object(samples: list[dict], ds: ShapesDataset):
    for s in samples:
        caption = s["caption"]
        m = s["labels"].numel()
        assert caption.count(" and ") == (1 if m > 1 else 0)
        for k in range(m):
            colour = ds.colour_names[int(s["properties"]["colour"][k])]
            shape = ds.class_names[int(s["labels"][k])]
            assert f"{colour} {shape}" in caption, (caption, colour, shape)
        assert sum(caption.count(name) for name in SHAPE_NAMES) == m


def test_caption_size_words_and_order(samples: list[dict]):
    p = P()
    third = (p.max_size - p.min_size) / 3
    for s in samples:
        sizes = s["properties"]["size"]
        words = s["caption"].replace(",", "").split()
        assert words.count("small") == int((sizes < p.min_size + third).sum())
        assert words.count("large") == int((sizes > p.max_size - third).sum())
        # Objects are described from left to right.
        order = torch.argsort(s["properties"]["x"], stable=True).tolist()
        shapes = [w for w in words if w in SHAPE_NAMES]
        assert shapes == [P().shapes[int(s["labels"][k])] for k in order]


def test_no_occlusion_keeps_full_objects():
    d = make("train", occlusion=False, max_objects=6)
    for i in range(40):
        s = d[i]
        full = d.full_masks(i)
        assert torch.equal(full, s["instance_masks"])
        assert full.sum(0).max() <= 1


def test_occlusion_happens_and_respects_min_visible():
    d = make("train", min_visible=0.3)
    occluded = 0
    for i in range(100):
        visible = d[i]["instance_masks"].sum((1, 2)).float()
        full = d.full_masks(i).sum((1, 2)).float()
        assert (visible <= full).all()
        assert (visible >= 0.3 * full).all()
        occluded += int((visible < full).sum())
    assert occluded > 0, "the default setting must produce some occlusion"


def test_hidden_objects_are_dropped():
    d = make("train", min_visible=0.0, min_objects=6, max_objects=6, min_size=0.3, max_size=0.5)
    dropped = 0
    for i in range(60):
        s = d[i]
        assert s["instance_masks"].flatten(1).any(1).all()
        assert s["labels"].numel() == d.full_masks(i).shape[0]
        dropped += 6 - s["labels"].numel()
    assert dropped > 0, "large crowded scenes should hide some objects completely"


def test_backgrounds_differ_across_images(samples: list[dict]):
    means = set()
    for s in samples[:20]:
        bg = s["image"][:, ~s["instance_masks"].any(0)]
        means.add(tuple(round(v, 3) for v in bg.mean(1).tolist()))
    assert len(means) == 20


def test_plain_background_is_black():
    s = make("train", background="plain")[0]
    bg = s["image"][:, ~s["instance_masks"].any(0)]
    assert bg.numel() > 0 and (bg == 0).all()


def test_all_shapes_render():
    d = make("train", shapes=list(SHAPE_NAMES), num_colours=10, min_objects=5, max_objects=5)
    seen = set()
    for i in range(60):
        seen.update(d[i]["labels"].tolist())
    assert seen == set(range(len(SHAPE_NAMES)))


def test_other_image_size():
    s = make("train", image_size=32)[0]
    assert s["image"].shape == (3, 32, 32) and s["instance_masks"].shape[1:] == (32, 32)


# ------------------------------------------------------------------ collate
def test_collate_pads(samples: list[dict], ds: ShapesDataset):
    few, many = None, None
    for s in samples:
        m = s["labels"].numel()
        if m == 2 and few is None:
            few = s
        if m == 5 and many is None:
            many = s
    assert few is not None and many is not None
    batch = ds.collate([few, many])
    assert isinstance(batch, Batch)
    assert batch.images.shape == (2, 3, 64, 64)
    assert batch.instance_masks.shape == (2, 5, 64, 64)
    assert not batch.instance_masks[0, 2:].any()
    assert torch.equal(batch.instance_masks[1], many["instance_masks"])
    assert torch.equal(batch.boxes[0, 2:], torch.zeros(3, 4))
    assert batch.labels[0, 2:].tolist() == [-1, -1, -1]
    assert torch.equal(batch.labels[0, :2], few["labels"])
    assert batch.properties["shape"][0, 2:].tolist() == [-1, -1, -1]
    assert batch.properties["colour"].dtype == torch.long
    assert batch.properties["size"].dtype == torch.float32
    assert batch.properties["size"][0, 2:].tolist() == [0.0, 0.0, 0.0]
    assert batch.properties["x"][0, 2:].tolist() == [0.0, 0.0, 0.0]
    c = max(few["class_ids"].numel(), many["class_ids"].numel())
    assert batch.class_masks.shape == (2, c, 64, 64)
    assert batch.ignore_mask.shape == (2, 64, 64)
    assert batch.captions == [few["caption"], many["caption"]]
    assert batch.index.tolist() == [few["index"], many["index"]]
    assert batch.available() == set(ShapesDataset.provides)
    ids = collate_class_ids([few, many])
    assert ids.shape == (2, c)
    assert (ids[0, few["class_ids"].numel() :] == -1).all()


def test_collate_only_sets_present_fields():
    image = torch.rand(3, 8, 8)
    batch = collate([{"image": image, "index": 3}, {"image": image, "index": 4}])
    assert batch.available() == {"batch.images", "batch.index"}
    assert batch.index.tolist() == [3, 4]
