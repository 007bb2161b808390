"""ocl-bench's GLASS pieces against GLASS's released code (github.com/visinf/glass), when present.

Opt-in: point OCL_BENCH_GLASS_REPO at a checkout of the official repository (it needs
`einops`). Two of its modules are imported, nothing is copied:

- `src/models/slot_attn.py` (MultiHeadSTEVESA: LSD's slot attention plus GLASS's `num_objs` /
  `use_mask` dynamic slots and the `bbox_mlp` slot initialisation). `distinctipy`, a
  colour-palette package its `src/models/utils.py` imports for visualisation only, is replaced
  by an empty stub. The same weights run through ocl-bench's `slot_attention`
  (position='cartesian', pre_mlp=true, eps=1e-6; `dynamic_slots`; init='boxes'): slots and
  last-iteration attention agree within 1e-5.
  The module's own `save_pretrained` folder imports with `ocl-bench import stablelsd`
  (importers/stablelsd.py) into a run that gives the same attention and conditioning.
- `src/eval/oclf_metrics/oclf_eval_masks.py` (OCLF's UnsupervisedMaskIoUMetric), configured as
  `src/eval/oclf_metrics/eval_metrics.py` configures the metric it reports as 'iou' (GLASS's
  mIoU, Tables 2, 6, 7): its constructor arguments are read from that script with `ast` at test
  time (the script parses the command line and loads models when imported). On random soft
  masks and semantic maps (empty images, fully ignored images, more classes than slots) it
  equals `object_discovery`'s `miou_c` image by image. Every other IoU metric the script
  reports (fg_iou, mbo_i, mbo_c, object_recovery, cor_loc), built and fed as the script builds
  and feeds it, equals `object_discovery` with `background_segment=true` (miou, mbo_i, mbo_c,
  detection_rate, corloc), and with `background_segment=false` the script's
  `--ignore_background` values (except cor_loc, which the script builds without that flag).

Where ocl-bench differs from the official code on purpose, a test says so: an image without
objects keeps one attending slot (the official code masks every slot and returns NaN).

    git --git-dir=/work/.mirror/visinf+glass/repo archive HEAD | tar -x -C /tmp/glass
    OCL_BENCH_GLASS_REPO=/tmp/glass python -m pytest tests/test_official_glass.py
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ocl_bench.api.contracts import Batch, Dims, Features
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.importers.stablelsd import StableLSDLayout, map_state
from ocl_bench.tasks.object_discovery import (
    ObjectDiscoveryParams,
    ignore_overlaps,
    masks_to_pred,
    miou,
    score_batch,
    with_background,
)
from tests.official_checkout import checkout_from_env, multihead_stevesa

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_GLASS_REPO", "src/models/slot_attn.py", "github.com/visinf/glass"
)
B, K, D, SIDE, ITERS = 4, 5, 32, 4, 3
IMAGE = 64  # our images (and masks); GLASS's boxes are pixels of its 256-px images
close = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def official_sa_class() -> type:
    return multihead_stevesa(REPO)


def _official(cls: type, init_mlp: bool, seed: int, out_size: int = 24) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(
        num_iterations=ITERS,
        num_slots=K,
        num_heads=1,  # GLASS's configs/coco/slot_attn/config.json
        input_size=D,
        out_size=out_size,
        slot_size=D,
        mlp_hidden_size=D,
        input_resolution=SIDE,
        epsilon=1e-6,
        init_mlp=init_mlp,
    ).eval()
    with torch.no_grad():  # off the init, so nothing agrees by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _official_to_ours(state: dict[str, torch.Tensor], boxes: bool) -> dict[str, torch.Tensor]:
    """The official MultiHeadSTEVESA state_dict in slot_attention's names, through the
    importer's own mapping (`ocl-bench import stablelsd`), so this also checks the importer."""
    init = "boxes" if boxes else "shared_gaussian"
    layout = StableLSDLayout(K, D, D, D, ITERS, init, "none", SIDE, unet="")
    mapped = map_state(state, layout)
    # the output projection (out_layer_norm, out_linear) is the decoder's
    return {k.removeprefix("grouping."): v for k, v in mapped.items() if k.startswith("grouping.")}


def _ours(official: torch.nn.Module, **params) -> SlotAttention:
    sa = SlotAttention(
        SlotAttentionParams(
            num_slots=K,
            slot_dim=D,
            iterations=ITERS,
            mlp_hidden=D,
            pre_mlp=True,
            position="cartesian",
            eps=1e-6,
            **params,
        ),
        Dims(image_size=(IMAGE, IMAGE), grid=(SIDE, SIDE), token_dim=D),
    )
    boxes = params.get("init") == "boxes"
    sa.load_state_dict(_official_to_ours(official.state_dict(), boxes), strict=True)
    return sa.eval()


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B,N,D] in raster order, the same as the official [B,1,D,h,w] input)."""
    tokens = torch.randn(B, SIDE * SIDE, D, generator=torch.Generator().manual_seed(seed))
    return tokens, tokens.transpose(1, 2).reshape(B, 1, D, SIDE, SIDE)


def _compare(official_out: tuple, ours_out) -> None:
    off_slots, off_attn = official_out  # [B,1,K,D], [B,1,heads,N,K]
    torch.testing.assert_close(ours_out.slots, off_slots[:, 0], **close)
    torch.testing.assert_close(ours_out.attn, off_attn[:, 0, 0], **close)


def _objects(counts: list[int]) -> torch.Tensor:
    """bool[B,M,IMAGE,IMAGE]: image b has counts[b] non-empty instance masks."""
    masks = torch.zeros(len(counts), max(counts), IMAGE, IMAGE, dtype=torch.bool)
    for b, m in enumerate(counts):
        for i in range(m):
            masks[b, i, i, :] = True
    return masks


def test_plain_slot_attention_matches_the_official(official_sa_class) -> None:
    official = _official(official_sa_class, init_mlp=False, seed=1)
    ours = _ours(official)
    tokens, grid = _tokens(2)
    with torch.no_grad():
        torch.manual_seed(3)  # the same Gaussian slot-init noise for both
        expected = official.forward_slots(grid)
        torch.manual_seed(3)
        got = ours(Features(tokens=tokens, grid=(SIDE, SIDE)))
    _compare(expected, got)


def test_dynamic_slots_match_the_official_num_objs_mask(official_sa_class) -> None:
    official = _official(official_sa_class, init_mlp=False, seed=4)
    ours = _ours(official, dynamic_slots=True)
    tokens, grid = _tokens(5)
    counts = [1, 2, K, K + 2]  # more objects than slots: every slot attends in both
    batch = Batch(images=torch.zeros(B, 3, IMAGE, IMAGE), instance_masks=_objects(counts))
    with torch.no_grad():
        torch.manual_seed(6)
        expected = official.forward_slots(grid, num_objs=torch.tensor(counts), use_mask=True)
        torch.manual_seed(6)
        got = ours(Features(tokens=tokens, grid=(SIDE, SIDE)), batch)
    _compare(expected, got)
    attending = (got.attn.sum(1) > 0).sum(1).tolist()
    assert attending == [1, 2, K, K]

    # an image without objects: the official code masks every slot (softmax of -inf: NaN);
    # ocl-bench keeps one slot attending, on purpose
    batch.instance_masks[0] = False
    with torch.no_grad():
        nan = official.forward_slots(grid, num_objs=torch.tensor([0, *counts[1:]]), use_mask=True)
        kept = ours(Features(tokens=tokens, grid=(SIDE, SIDE)), batch)
    assert nan[1][0].isnan().all() and not nan[1][1:].isnan().any()
    assert kept.attn.isfinite().all() and (kept.attn[0].sum(0) > 0).sum() == 1


def test_box_initialised_slots_match_the_official_bbox_mlp(official_sa_class) -> None:
    official = _official(official_sa_class, init_mlp=True, seed=7)
    ours = _ours(official, init="boxes")
    tokens, grid = _tokens(8)
    g = torch.Generator().manual_seed(9)
    counts = [1, 3, K, K + 2]  # fewer boxes than slots (padding) and more (cut at K)
    boxes = torch.zeros(B, max(counts), 4)  # ocl-bench: pixels of our 64-px masks, zero-padded
    for b, m in enumerate(counts):
        x1y1 = torch.randint(0, IMAGE // 2, (m, 2), generator=g).float()
        size = torch.randint(1, IMAGE // 2, (m, 2), generator=g).float()
        boxes[b, :m] = torch.cat([x1y1, x1y1 + size], 1)
    # GLASS's loader: pixels of its 256-px images, padded with -1 to at least 7 rows
    official_boxes = torch.full((B, max(7, max(counts)), 4), -1.0)
    for b, m in enumerate(counts):
        official_boxes[b, :m] = boxes[b, :m] * (256 / IMAGE)
    batch = Batch(
        images=torch.zeros(B, 3, IMAGE, IMAGE), instance_masks=_objects(counts), boxes=boxes
    )
    with torch.no_grad():
        expected = official.forward_slots(grid, bbox=official_boxes)
        got = ours(Features(tokens=tokens, grid=(SIDE, SIDE)), batch)
        init = official.bbox_mlp(official_boxes[:, :K])
    torch.testing.assert_close(got.init, init, **close)
    _compare(expected, got)


def test_saved_checkpoint_imports_as_a_run_with_the_official_outputs(
    official_sa_class, tmp_path
) -> None:
    """`ocl-bench import stablelsd` on the module's own save_pretrained folder."""
    from ocl_bench.importers.stablelsd import StableLSDImporter
    from ocl_bench.run.evaluate import load_run
    from tests.test_import_stablelsd import TINY

    official = _official(official_sa_class, init_mlp=True, seed=11, out_size=32)
    official.save_pretrained(tmp_path / "ckpt" / "multiheadstevesa")
    weights = tmp_path / "ckpt" / "multiheadstevesa" / "diffusion_pytorch_model.safetensors"
    result = StableLSDImporter(StableLSDImporter.Params()).import_run(
        weights, tmp_path / "run", TINY
    )
    # GLASS's save_pretrained records init_mlp, so the run names GLASS's protocol
    assert result.layout.method == "glass"
    _, model, _ = load_run(tmp_path / "run")
    tokens, grid = _tokens(12)
    boxes = torch.tensor([[[2.0, 4.0, 20.0, 30.0]]] * B)  # pixels of 32-px shapes images
    official_boxes = torch.full((B, 7, 4), -1.0)
    official_boxes[:, 0] = boxes[:, 0] * (256 / 32)
    with torch.no_grad():
        projected, attn = official(grid, bbox=official_boxes)
        slots = model.grouping.eval()(
            Features(tokens=tokens, grid=(SIDE, SIDE)),
            Batch(images=torch.zeros(B, 3, 32, 32), boxes=boxes),
        )
        cond = model.decoder.condition(slots.slots)
    torch.testing.assert_close(slots.attn, attn[:, 0, 0], **close)
    torch.testing.assert_close(cond, projected[:, 0], **close)


# GLASS's mIoU ------------------------------------------------------------------------------


def _reported_iou_metric_kwargs() -> dict:
    """The constructor arguments of the metric eval_metrics.py reports as 'iou', read from the
    script: the name the 'iou' entry computes, then that name's UnsupervisedMaskIoUMetric(...)
    call, evaluated with the script's defaults (eval_oclf_metrics_coco.sh passes no
    --ignore_background)."""
    path = Path(REPO) / "src" / "eval" / "oclf_metrics" / "eval_metrics.py"
    tree = ast.parse(path.read_text())
    name = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "iou":
                    name = ast.unparse(value).split(".")[0]  # `x.compute().item()` -> x
    assert name, f"no 'iou' entry in {path}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and [ast.unparse(t) for t in node.targets] == [name]
            and isinstance(node.value, ast.Call)
        ):
            assert ast.unparse(node.value.func) == "UnsupervisedMaskIoUMetric"
            defaults = {"args": argparse.Namespace(ignore_background=False)}
            return {
                kw.arg: eval(compile(ast.Expression(kw.value), str(path), "eval"), defaults)
                for kw in node.value.keywords
            }
    raise AssertionError(f"{name} is not built in {path}")


@pytest.fixture(scope="module")
def official_iou_metric() -> type:
    path = Path(REPO) / "src" / "eval" / "oclf_metrics" / "oclf_eval_masks.py"
    spec = importlib.util.spec_from_file_location("glass_oclf_eval_masks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwargs = _reported_iou_metric_kwargs()
    assert kwargs.get("ignore_background") is False  # the background is a segment
    return lambda: module.UnsupervisedMaskIoUMetric(**kwargs)


def _semantic_maps(n: int, classes: int, side: int, g: torch.Generator) -> torch.Tensor:
    """long[n,side,side] label maps, 0 = background: random rectangles of random classes."""
    maps = torch.zeros(n, side, side, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(0, 5, (1,), generator=g))):
            y, x = torch.randint(0, side - 4, (2,), generator=g).tolist()
            h, w = torch.randint(3, side // 2, (2,), generator=g).tolist()
            maps[i, y : y + h, x : x + w] = int(torch.randint(1, classes + 1, (1,), generator=g))
    return maps


def _class_masks(maps: torch.Tensor) -> torch.Tensor:
    """ocl-bench's batch.class_masks: one mask per class present (background dropped), padded."""
    per_image = [m[None] == m.unique()[m.unique() > 0][:, None, None] for m in maps]
    c = max(1, max(x.shape[0] for x in per_image))
    out = torch.zeros(maps.shape[0], c, *maps.shape[1:], dtype=torch.bool)
    for i, x in enumerate(per_image):
        out[i, : x.shape[0]] = x
    return out


@pytest.mark.parametrize("slots", [3, 7])  # fewer slots than segments, and more
@pytest.mark.parametrize("with_ignore", [False, True])
def test_miou_c_equals_glass_reported_iou(official_iou_metric, slots, with_ignore) -> None:
    g = torch.Generator().manual_seed(slots + 10 * with_ignore)
    n, side = 12, 32
    maps = _semantic_maps(n, classes=6, side=side, g=g)
    maps[0] = 0  # an image of background only: one segment, still scored
    soft = torch.rand(n, slots, 8, 8, generator=g) ** 3  # slot masks at the attention grid
    ignore = torch.rand(n, side, side, generator=g) < 0.15 if with_ignore else None
    if ignore is not None:
        ignore[1] = True  # nothing left to score: skipped by both
    # eval_metrics.py: attn upsampled bilinearly to the mask size, one-hot semantic map
    attn = F.interpolate(soft, size=(side, side), mode="bilinear")
    expected = []
    for i in range(n):
        metric = official_iou_metric()
        metric.update(
            attn[i : i + 1],
            F.one_hot(maps[i : i + 1], 7).permute(0, 3, 1, 2),
            None if ignore is None else ignore[i : i + 1, None],
        )
        expected.append(metric.compute().item() if metric.total else float("nan"))
    expected = torch.tensor(expected, dtype=torch.float64)

    pred = masks_to_pred(soft, (side, side))
    got = miou(pred, with_background(_class_masks(maps)), ignore)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert got[1].isnan() == with_ignore and not got[0].isnan()
    everyone = official_iou_metric()  # the script's running mean over the whole set
    all_ignored = None if ignore is None else ignore[:, None]
    everyone.update(attn, F.one_hot(maps, 7).permute(0, 3, 1, 2), all_ignored)
    assert got.nanmean().item() == pytest.approx(everyone.compute().item(), abs=1e-12)
    # without the background segment the score is another number: GLASS counts it
    assert not torch.allclose(miou(pred, _class_masks(maps), ignore), got, equal_nan=True)


# GLASS's other IoU metrics: the background is a segment in all of them ----------------------

# eval_metrics.py's reported keys -> object_discovery's metrics
SCRIPT_TO_OURS = {
    "fg_iou": "miou",
    "iou": "miou_c",
    "mbo_i": "mbo_i",
    "mbo_c": "mbo_c",
    "object_recovery": "detection_rate",
    "cor_loc": "corloc",
}


def _script_metrics(ignore_background: bool) -> dict[str, tuple[str, dict, str]]:
    """Each IoU metric eval_metrics.py reports: key -> (class name, constructor keywords
    evaluated as with/without `--ignore_background`, the mask its update() gets:
    'instance_mask' or 'segmentation_mask'), read from the script with `ast`."""
    path = Path(REPO) / "src" / "eval" / "oclf_metrics" / "eval_metrics.py"
    tree = ast.parse(path.read_text())
    names = {}  # reported key -> variable
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and any(
            isinstance(k, ast.Constant) and k.value == "iou" for k in node.keys
        ):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in SCRIPT_TO_OURS:
                    names[key.value] = ast.unparse(value).split(".")[0]
    assert set(names) == set(SCRIPT_TO_OURS), f"{path} reports {sorted(names)}"
    built, fed = {}, {}
    defaults = {"args": argparse.Namespace(ignore_background=ignore_background)}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and (target := ast.unparse(node.targets[0])) in names.values()
        ):
            built[target] = (
                ast.unparse(node.value.func),
                {
                    kw.arg: eval(compile(ast.Expression(kw.value), str(path), "eval"), defaults)
                    for kw in node.value.keywords
                },
            )
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
            owner = ast.unparse(call.func.value)
            if call.func.attr == "update" and owner in names.values():
                fed[owner] = ast.unparse(call.args[1])
    return {key: (*built[var], fed[var]) for key, var in names.items()}


@pytest.fixture(scope="module")
def oclf_masks() -> types.ModuleType:
    path = Path(REPO) / "src" / "eval" / "oclf_metrics" / "oclf_eval_masks.py"
    spec = importlib.util.spec_from_file_location("glass_oclf_eval_masks_all", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instances(n: int, side: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(instance masks, class masks) bool[n,M,side,side]: up to 5 random rectangles per image
    that may overlap, each of one of 4 classes; a class mask is the union of its instances."""
    inst = torch.zeros(n, 5, side, side, dtype=torch.bool)
    classes = torch.zeros(n, 4, side, side, dtype=torch.bool)
    for i in range(n):
        for m in range(int(torch.randint(1, 6, (1,), generator=g))):
            y, x = torch.randint(0, side - 4, (2,), generator=g).tolist()
            h, w = torch.randint(3, side // 2, (2,), generator=g).tolist()
            inst[i, m, y : y + h, x : x + w] = True
            classes[i, int(torch.randint(0, 4, (1,), generator=g))] |= inst[i, m]
    return inst, classes


def _label_zero_first(masks: torch.Tensor) -> torch.Tensor:
    """The script's target layout: channel 0 = label 0 (no object), then one per segment."""
    return torch.cat([(masks.sum(1, keepdim=True) == 0), masks], 1).long()


@pytest.mark.parametrize("slots", [3, 7])  # fewer slots than segments, and more
@pytest.mark.parametrize("dataset_ignores_overlaps", [True, False])
def test_background_segment_equals_the_scripts_iou_metrics(
    oclf_masks, slots, dataset_ignores_overlaps
) -> None:
    g = torch.Generator().manual_seed(slots + 10 * dataset_ignores_overlaps)
    n, side = 12, 32
    inst, classes = _instances(n, side, g)
    inst[0], classes[0] = False, False  # no objects: the script scores its background
    soft = torch.rand(n, slots, 8, 8, generator=g) ** 3
    ignore = torch.rand(n, side, side, generator=g) < 0.1
    ignore[1] = True  # nothing left to score: skipped by both
    if dataset_ignores_overlaps:  # the coco dataset's overlaps_ignored (SPOT's mask_ignore)
        ignore = ignore_overlaps(inst, ignore)
    attn = F.interpolate(soft, size=(side, side), mode="bilinear")
    pred = masks_to_pred(soft, (side, side))
    targets = {"instance_mask": inst, "segmentation_mask": classes}
    compared = set()
    for ignore_background in (False, True):
        params = ObjectDiscoveryParams(background_segment=not ignore_background)
        ours = score_batch(pred, inst, ignore, classes, params, num_slots=slots)
        for key, (cls, kwargs, fed) in _script_metrics(ignore_background).items():
            name = SCRIPT_TO_OURS[key]
            if ignore_background and key == "iou":
                continue  # miou_c always counts the background (compared in the test above)
            if ignore_background and key in ("iou", "mbo_c") and not dataset_ignores_overlaps:
                # without the background segment mbo_c reads overlaps from the dataset's
                # ignore mask as before; GLASS's metric would also drop class overlaps
                continue
            if ignore_background and key == "cor_loc":
                # the script builds CorLoc without ignore_background: it counts the background
                # with the flag too, so its value is background_segment=true's
                assert "ignore_background" not in kwargs
                kwargs = {**kwargs, "ignore_background": True}  # OCLF's CorLoc
            target = _label_zero_first(targets[fed])
            expected = []
            for i in range(n):
                metric = getattr(oclf_masks, cls)(**kwargs)
                metric.update(attn[i : i + 1], target[i : i + 1], ignore[i : i + 1, None])
                expected.append(metric.compute().item() if metric.total else float("nan"))
            expected = torch.tensor(expected, dtype=torch.float64)
            # the script's discovery fraction divides in float32
            tol = 1e-6 if key == "object_recovery" else 1e-12
            got = ours[name]
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, equal_nan=True)
            assert got[1].isnan() and got[0].isnan() == ignore_background, (key, got[:2])
            everyone = getattr(oclf_masks, cls)(**kwargs)  # the script's running mean
            everyone.update(attn, target, ignore[:, None])
            assert got.nanmean().item() == pytest.approx(everyone.compute().item(), abs=tol)
            compared.add((key, ignore_background))
    assert len(compared) == (11 if dataset_ignores_overlaps else 10)
    # the background segment is scored: the values are not those without it
    plain = score_batch(pred, inst, ignore, classes, ObjectDiscoveryParams(), num_slots=slots)
    glass = score_batch(
        pred, inst, ignore, classes, ObjectDiscoveryParams(background_segment=True), slots
    )
    for name in ("mbo_i", "mbo_c", "miou", "corloc", "detection_rate"):
        assert not torch.allclose(plain[name], glass[name], equal_nan=True), name
    torch.testing.assert_close(plain["fg_ari"], glass["fg_ari"], rtol=0, atol=0)
