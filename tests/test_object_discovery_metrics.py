"""Object discovery metrics against an independent, loop-based reference.

The reference below works one image at a time in numpy: sklearn's adjusted_rand_score on
foreground pixels when no pixel is in two GT masks (otherwise OCLF's formula from a contingency
table filled pixel by pixel, in exact integers), explicit slot x object loops for IoU, exact
fractions for the > 0.5 test and scipy's minimising assignment on negated IoU for mIoU.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

import ocl_bench.tasks.object_discovery_metrics as odm
from ocl_bench.tasks.object_discovery import ObjectDiscoveryParams, score_batch, with_background
from ocl_bench.tasks.object_discovery_metrics import (
    all_metrics,
    corloc,
    detection_rate,
    fg_ari,
    ignore_overlaps,
    masks_to_pred,
    mbo,
    miou,
)

NAMES = ("fg_ari", "mbo", "miou", "corloc", "detection_rate")
SINGLE = {
    "fg_ari": fg_ari,
    "mbo": mbo,
    "miou": miou,
    "corloc": corloc,
    "detection_rate": detection_rate,
}


# ------------------------------------------------------------------------------------------
# Reference implementation


def _ref_ari_oclf_loops(pred: np.ndarray, masks: list[np.ndarray], num_slots: int) -> float:
    """OCLF's formula with a contingency table filled one pixel at a time (exact integers)."""
    table = [[0] * num_slots for _ in masks]
    height, width = pred.shape
    for y in range(height):
        for x in range(width):
            for i, mask in enumerate(masks):
                if mask[y, x]:
                    table[i][int(pred[y, x])] += 1
    rows = [sum(r) for r in table]
    cols = [sum(table[i][j] for i in range(len(masks))) for j in range(num_slots)]
    n = sum(rows)
    ri = sum(v * (v - 1) for r in table for v in r)
    a = sum(v * (v - 1) for v in rows)
    b = sum(v * (v - 1) for v in cols)
    expected = a * b / max(n * (n - 1), 1)
    maximum = (a + b) / 2
    if maximum - expected <= 0:
        return 1.0
    return (ri - expected) / (maximum - expected)


def _ref_ari(pred: np.ndarray, masks: list[np.ndarray], num_slots: int) -> float:
    coverage = np.zeros(pred.shape, dtype=int)
    for mask in masks:
        coverage += mask
    if (coverage > 1).any():
        return _ref_ari_oclf_loops(pred, masks, num_slots)
    fg = coverage == 1
    if not fg.any():
        return 1.0
    labels = np.full(pred.shape, -1)
    for i, mask in enumerate(masks):
        labels[mask] = i
    return float(adjusted_rand_score(labels[fg], pred[fg]))


def _ref_image(pred, gt, ignore, num_slots: int) -> dict[str, float]:
    keep = np.ones(pred.shape, dtype=bool) if ignore is None else ~ignore
    masks = [gt[m] & keep for m in range(gt.shape[0])]
    result = {"fg_ari": _ref_ari(pred, masks, num_slots)}

    objects = [mask for mask in masks if mask.sum() > 0]
    if not objects:
        result.update(mbo=math.nan, miou=math.nan, corloc=math.nan, detection_rate=math.nan)
        return result
    ious = np.zeros((num_slots, len(objects)))
    found = []
    for j, obj in enumerate(objects):
        best = Fraction(0)
        for k in range(num_slots):
            slot = (pred == k) & keep
            inter = int((slot & obj).sum())
            union = int((slot | obj).sum())
            value = Fraction(inter, union) if union else Fraction(0)
            ious[k, j] = float(value)
            best = max(best, value)
        found.append(best > Fraction(1, 2))
    rows, cols = linear_sum_assignment(-ious)
    result["miou"] = float(sum(ious[r, c] for r, c in zip(rows, cols, strict=True)) / len(objects))
    result["mbo"] = float(np.mean([ious[:, j].max() for j in range(len(objects))]))
    result["corloc"] = 1.0 if any(found) else 0.0
    result["detection_rate"] = sum(found) / len(found)
    return result


def reference(pred: torch.Tensor, gt: torch.Tensor, ignore=None, num_slots=None):
    pred_np = pred.numpy()
    gt_np = gt.numpy().astype(bool)
    ignore_np = None if ignore is None else ignore.numpy().astype(bool)
    if num_slots is None:
        num_slots = int(pred_np.max()) + 1
    per_image = [
        _ref_image(pred_np[b], gt_np[b], None if ignore_np is None else ignore_np[b], num_slots)
        for b in range(pred_np.shape[0])
    ]
    return {name: np.array([row[name] for row in per_image]) for name in NAMES}


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(NAMES)
    for name in NAMES:
        value = got[name]
        assert value.dtype == torch.float64, name
        np.testing.assert_allclose(
            value.numpy(), want[name], rtol=0, atol=1e-6, equal_nan=True, err_msg=name
        )


# ------------------------------------------------------------------------------------------
# Random cases


def _rectangles(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(1, 3)):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1 = rng.integers(y0 + 1, height + 1)
        x1 = rng.integers(x0 + 1, width + 1)
        mask[y0:y1, x0:x1] = True
    return mask


def random_case(seed: int, num_masks: int | None = None, overlaps: bool | None = None):
    rng = np.random.default_rng(seed)
    batch = int(rng.choice([1, 2, 4]))
    slots = int(rng.choice([1, 2, 3, 5, 7]))
    if num_masks is None:
        num_masks = int(rng.choice([0, 1, 2, 4, 8, 11]))
    height, width = [(1, 1), (5, 7), (12, 9), (16, 16), (13, 21)][rng.integers(0, 5)]
    if overlaps is None:
        overlaps = bool(rng.integers(0, 2))

    gt = np.zeros((batch, num_masks, height, width), dtype=bool)
    pred = np.zeros((batch, height, width), dtype=np.int64)
    for b in range(batch):
        present = int(rng.integers(0, num_masks + 1))  # the rest stay as zero padding
        taken = np.zeros((height, width), dtype=bool)
        for m in range(present):
            mask = _rectangles(rng, height, width)
            if not overlaps:
                mask &= ~taken
            taken |= mask
            gt[b, m] = mask
        if rng.random() < 0.5:  # slots loosely follow the objects, so IoUs land near 0.5
            pred[b] = rng.integers(0, slots)
            for m in range(present):
                pred[b][gt[b, m]] = (m + rng.integers(0, 2)) % slots
            noise = rng.random((height, width)) < rng.choice([0.05, 0.3])
            pred[b][noise] = rng.integers(0, slots, size=int(noise.sum()))
        else:  # blocky random segmentation
            for _ in range(4):
                pred[b][_rectangles(rng, height, width)] = rng.integers(0, slots)
    if rng.random() < 0.3:
        pred[0, 0, 0] = slots - 1  # make sure K = slots for the reference

    ignore = None
    if rng.random() < 0.6:
        ignore = rng.random((batch, height, width)) < rng.choice([0.05, 0.3])
        if rng.random() < 0.5:
            ignore |= np.stack([_rectangles(rng, height, width) for _ in range(batch)])
        ignore = torch.from_numpy(ignore)
    return torch.from_numpy(pred), torch.from_numpy(gt), ignore


@pytest.mark.parametrize("seed", range(80))
def test_random_cases_match_reference(seed):
    pred, gt, ignore = random_case(seed)
    assert_matches(all_metrics(pred, gt, ignore), reference(pred, gt, ignore))


@pytest.mark.parametrize("seed", range(20))
def test_random_cases_with_overlaps_ignored(seed):
    pred, gt, ignore = random_case(1000 + seed, overlaps=True)
    ignore = ignore_overlaps(gt, ignore)
    assert_matches(all_metrics(pred, gt, ignore), reference(pred, gt, ignore))


@pytest.mark.parametrize("seed", range(10))
def test_single_metric_functions_equal_all_metrics(seed):
    pred, gt, ignore = random_case(2000 + seed, num_masks=4)
    together = all_metrics(pred, gt, ignore)
    for name, fn in SINGLE.items():
        value = fn(pred, gt, ignore)
        assert value.shape == (pred.shape[0],)
        assert torch.equal(value.isnan(), together[name].isnan()), name
        assert torch.allclose(value.nan_to_num(), together[name].nan_to_num(), atol=0), name


@pytest.mark.parametrize("seed", range(10))
def test_many_masks_and_small_histograms(seed, monkeypatch):
    """More masks than fit in one byte, and histograms split over several passes."""
    pred, gt, ignore = random_case(3000 + seed, num_masks=19)
    want = reference(pred, gt, ignore)
    assert_matches(all_metrics(pred, gt, ignore), want)
    monkeypatch.setattr(odm, "_MAX_HIST_BINS", 16)
    assert_matches(all_metrics(pred, gt, ignore), want)


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(30):
        slots, objects = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        pred = torch.from_numpy(rng.integers(0, slots, size=(1, 6, 6)))
        gt = torch.from_numpy(np.stack([_rectangles(rng, 6, 6) for _ in range(objects)])[None])
        ious = np.zeros((slots, objects))
        for k in range(slots):
            for m in range(objects):
                p, t = pred[0].numpy() == k, gt[0, m].numpy()
                ious[k, m] = (p & t).sum() / (p | t).sum() if (p | t).any() else 0.0
        if slots >= objects:
            assignments = itertools.permutations(range(slots), objects)
            best = max(sum(ious[a[m], m] for m in range(objects)) for a in assignments)
        else:
            assignments = itertools.permutations(range(objects), slots)
            best = max(sum(ious[k, a[k]] for k in range(slots)) for a in assignments)
        assert miou(pred, gt).item() == pytest.approx(best / objects, abs=1e-12)


# ------------------------------------------------------------------------------------------
# Edge cases


def _image(rows: list[str]) -> torch.Tensor:
    """Slot indices from strings like '0011' (one string per row), as long[1,H,W]."""
    return torch.tensor([[int(c) for c in row] for row in rows]).unsqueeze(0)


def _masks(*rows_per_mask: list[str]) -> torch.Tensor:
    """GT masks from strings like '1100', as bool[1,M,H,W]."""
    masks = [[[c == "1" for c in row] for row in rows] for rows in rows_per_mask]
    return torch.tensor(masks, dtype=torch.bool).unsqueeze(0)


def _values(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: result[name].item() for name in NAMES}


@pytest.mark.parametrize("num_masks", [0, 3])
def test_no_objects(num_masks):
    pred = torch.randint(0, 4, (2, 5, 6), generator=torch.Generator().manual_seed(0))
    gt = torch.zeros(2, num_masks, 5, 6, dtype=torch.bool)
    result = all_metrics(pred, gt)
    assert result["fg_ari"].tolist() == [1.0, 1.0]
    for name in ("mbo", "miou", "corloc", "detection_rate"):
        assert result[name].isnan().all(), name
        assert result[name].shape == (2,)


def test_one_object_covered_by_one_slot():
    gt = _masks(["0110", "0110", "0000"])
    pred = _image(["2222", "2222", "0012"])  # slot 2 takes the whole object and some background
    result = _values(all_metrics(pred, gt))
    assert result["fg_ari"] == 1.0
    assert result["mbo"] == pytest.approx(4 / 9)
    assert result["detection_rate"] == 0.0


def test_one_object_split_over_slots():
    gt = _masks(["0110", "0110", "0000"])
    pred = _image(["0110", "0220", "0000"])
    result = _values(all_metrics(pred, gt))
    assert result["fg_ari"] == 0.0
    assert result["mbo"] == pytest.approx(0.5)
    assert result["miou"] == pytest.approx(0.5)
    assert result["corloc"] == 0.0
    assert result["detection_rate"] == 0.0


def test_one_object_exactly_zero_at_realistic_size():
    gt = torch.zeros(1, 1, 320, 320, dtype=torch.bool)
    gt[0, 0, 50:250, 40:300] = True
    pred = torch.zeros(1, 320, 320, dtype=torch.long)
    pred[0, 100:, :] = 3
    assert fg_ari(pred, gt).item() == 0.0
    pred[0] = 1
    assert fg_ari(pred, gt).item() == 1.0


def test_toy_case_from_reference():
    """Two GT halves, one slot covers the whole image."""
    gt = _masks(["1100"] * 4, ["0011"] * 4)
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    result = _values(all_metrics(pred, gt))
    assert result["miou"] == pytest.approx(0.25)
    assert result["mbo"] == pytest.approx(0.5)
    assert result["detection_rate"] == 0.0
    assert result["corloc"] == 0.0
    assert result["fg_ari"] == 0.0
    # Extra empty slots change nothing.
    assert _values(all_metrics(pred, gt, num_slots=5)) == pytest.approx(result)


def test_ignore_leaves_intersection_and_union():
    gt = _masks(["1110"])
    pred = _image(["0011"])
    assert mbo(pred, gt).item() == pytest.approx(2 / 3)
    ignore = torch.tensor([[[False, False, True, False]]])
    result = _values(all_metrics(pred, gt, ignore))
    assert result["mbo"] == 1.0
    assert result["miou"] == 1.0
    assert result["detection_rate"] == 1.0
    assert result["fg_ari"] == 1.0


def test_object_fully_ignored_is_dropped():
    gt = _masks(["110000"], ["001100"], ["000011"])
    pred = _image(["000022"])
    ignore = torch.tensor([[[False, False, True, True, False, False]]])
    # Without ignore: IoUs 0.5, 0.5, 1.
    assert _values(all_metrics(pred, gt))["mbo"] == pytest.approx(2 / 3)
    # With it, object 1 vanishes (it does not score 0) and slot 0 shrinks onto object 0.
    result = _values(all_metrics(pred, gt, ignore))
    assert result == pytest.approx(_values(all_metrics(pred, gt[:, [0, 2]], ignore)))
    assert result == {"fg_ari": 1.0, "mbo": 1.0, "miou": 1.0, "corloc": 1.0, "detection_rate": 1.0}


def test_only_object_fully_ignored_is_skipped():
    gt = _masks(["0110"])
    pred = _image(["0123"])
    ignore = torch.tensor([[[False, True, True, False]]])
    result = all_metrics(pred, gt, ignore)
    assert result["fg_ari"].item() == 1.0
    for name in ("mbo", "miou", "corloc", "detection_rate"):
        assert result[name].isnan().all(), name


def test_more_objects_than_slots():
    gt = _masks(["110000"], ["001100"], ["000011"])
    pred = _image(["001111"])
    result = _values(all_metrics(pred, gt))
    # IoU(slot 0, obj 0) = 1; IoU(slot 1, obj 1) = IoU(slot 1, obj 2) = 0.5; one GT unmatched.
    assert result["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["mbo"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert result["detection_rate"] == pytest.approx(1 / 3)
    assert result["corloc"] == 1.0


def test_padding_masks_change_nothing():
    pred, gt, ignore = random_case(11, num_masks=4)
    empty = torch.zeros_like(gt[:, :1])
    padded = torch.cat([empty, gt[:, :2], empty, empty, gt[:, 2:], empty], dim=1)
    plain, with_padding = all_metrics(pred, gt, ignore), all_metrics(pred, padded, ignore)
    for name in NAMES:
        assert torch.allclose(plain[name], with_padding[name], atol=1e-12, equal_nan=True)


def test_strict_half_boundary():
    pred = torch.zeros(1, 1, 10, dtype=torch.long)
    exactly_half = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    exactly_half[..., :5] = True
    result = _values(all_metrics(pred, exactly_half))
    assert result["mbo"] == 0.5
    assert result["detection_rate"] == 0.0
    assert result["corloc"] == 0.0
    above = exactly_half.clone()
    above[..., 5] = True
    result = _values(all_metrics(pred, above))
    assert result["detection_rate"] == 1.0
    assert result["corloc"] == 1.0


def test_detection_rate_is_per_image():
    gt = torch.zeros(2, 3, 1, 6, dtype=torch.bool)
    gt[0, 0, 0, :2] = True  # image 0: one object, found
    gt[1, 0, 0, :2] = True  # image 1: three objects, one found
    gt[1, 1, 0, 2:4] = True
    gt[1, 2, 0, 4:] = True
    pred = torch.tensor([[[0, 0, 1, 1, 1, 1]], [[0, 0, 1, 1, 1, 1]]])
    rate = detection_rate(pred, gt)
    assert rate.tolist() == pytest.approx([1.0, 1 / 3])


def test_fg_ari_counts_overlap_pixels_in_every_row():
    gt = _masks(["11100"], ["00110"])
    pred = _image(["00012"])
    # n = [[3, 0, 0], [1, 1, 0]]; a = [3, 2]; b = [4, 1, 0]; n = 5
    # RI = 6, A = 8, B = 12, E = 96 / 20, M = 10 -> ARI = 1.2 / 5.2
    assert fg_ari(pred, gt).item() == pytest.approx(3 / 13, abs=1e-12)
    ignore = ignore_overlaps(gt)
    assert ignore.tolist() == [[[False, False, True, False, False]]]
    # Without the overlap pixel: GT labels [0, 0, 1], slots [0, 0, 1] -> perfect.
    assert fg_ari(pred, gt, ignore).item() == 1.0


def test_fg_ari_background_drops_out():
    gt = _masks(["1100", "0000"], ["0011", "0000"])
    pred_a = _image(["0011", "2233"])
    pred_b = _image(["0011", "1100"])  # differs from pred_a on background pixels only
    pred_c = _image(["0122", "2233"])  # differs from pred_a on foreground pixels
    assert fg_ari(pred_a, gt).item() == 1.0
    assert fg_ari(pred_b, gt).item() == 1.0
    assert fg_ari(pred_c, gt).item() < 1.0


def test_ignore_overlaps():
    gt = torch.zeros(1, 3, 2, 3, dtype=torch.bool)
    gt[0, 0, 0, :] = True
    gt[0, 1, :, 1] = True
    gt[0, 2, 1, :] = True
    assert ignore_overlaps(gt).tolist() == [[[False, True, False], [False, True, False]]]
    extra = torch.zeros(1, 2, 3, dtype=torch.bool)
    extra[0, 0, 0] = True
    assert ignore_overlaps(gt, extra).tolist() == [[[True, True, False], [False, True, False]]]
    assert not ignore_overlaps(gt[:, :1]).any()


def test_input_layouts_and_dtypes():
    """Views with unaligned offsets or gaps, uint8 masks and int32 indices change nothing."""
    rng = np.random.default_rng(5)
    pred = torch.from_numpy(rng.integers(0, 4, size=(1, 2, 4)))  # 8 pixels: one int64 word
    gt = torch.from_numpy(rng.random((1, 3, 2, 4)) < 0.4)
    ignore = torch.from_numpy(rng.random((1, 2, 4)) < 0.2)
    big = torch.zeros(1, 3, 3, 4, dtype=torch.bool)
    big[:, :, 1:] = gt
    view = big[:, :, 1:]  # pixels contiguous per mask, storage offset 4 bytes, gaps between masks
    assert torch.equal(view, gt) and view[:, :1].storage_offset() % 8 == 4
    variants = [
        (gt, view),
        (gt[:, :1], view[:, :1]),  # contiguous but unaligned
        (gt, gt.to(torch.uint8)),
        (gt, gt.transpose(2, 3).contiguous().mT),
    ]
    for reference_gt, other_gt in variants:
        want = all_metrics(pred, reference_gt.contiguous(), ignore)
        for p in (pred, pred.to(torch.int32)):
            got = all_metrics(p, other_gt, ignore)
            for name in NAMES:
                assert torch.allclose(got[name], want[name], atol=0, equal_nan=True), name


def test_num_slots_validation():
    pred = _image(["0123"])
    gt = _masks(["1100"])
    with pytest.raises(ValueError):
        all_metrics(pred, gt, num_slots=3)
    with pytest.raises(ValueError):
        all_metrics(pred - 1, gt)
    with pytest.raises(ValueError):
        all_metrics(pred, gt[0])


def test_masks_to_pred_upsamples_before_argmax():
    # Slot 2 never wins at low resolution but wins between the two cells once interpolated.
    soft = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.9, 0.9]]]])  # [1, 3, 1, 2]
    pred = masks_to_pred(soft, (1, 4))
    assert pred.dtype == torch.long
    assert pred.tolist() == [[[0, 2, 2, 1]]]
    nearest = torch.nn.functional.interpolate(
        soft.argmax(1, keepdim=True).float(), size=(1, 4), mode="nearest"
    )
    assert nearest.long().squeeze(1).tolist() == [[[0, 0, 1, 1]]]


def test_masks_to_pred_ties_go_to_lowest_index():
    soft = torch.zeros(2, 4, 3, 3)
    soft[1, 1:] = 0.5  # slots 1..3 tie above slot 0
    pred = masks_to_pred(soft, (6, 5))
    assert pred.shape == (2, 6, 5)
    assert (pred[0] == 0).all()
    assert (pred[1] == 1).all()


def test_masks_to_pred_matches_interpolate_then_argmax():
    soft = torch.rand(3, 5, 7, 7, generator=torch.Generator().manual_seed(3))
    expected = torch.nn.functional.interpolate(
        soft, size=(20, 30), mode="bilinear", align_corners=False
    ).argmax(1)
    assert torch.equal(masks_to_pred(soft, (20, 30)), expected)


# ------------------------------------------------------------------------------------------
# object_discovery's background_segment (GLASS's evaluation)

GLASS = ObjectDiscoveryParams(background_segment=True)


def test_a_slot_on_exactly_the_background_is_a_perfect_match_only_with_background_segment():
    gt = _masks(["0110", "0110", "0000"])
    pred = _image(["0110", "0220", "0000"])  # slot 0 is the background, the object is split
    off = score_batch(pred, gt, None, gt, ObjectDiscoveryParams())
    on = score_batch(pred, gt, None, gt, GLASS)
    assert {k: off[k].item() for k in ("mbo_i", "mbo_c", "miou", "corloc", "detection_rate")} == {
        "mbo_i": 0.5,
        "mbo_c": 0.5,
        "miou": 0.5,
        "corloc": 0.0,
        "detection_rate": 0.0,
    }
    # the background is one more segment, matched by slot 0 with IoU 1
    assert {k: on[k].item() for k in ("mbo_i", "mbo_c", "miou", "corloc", "detection_rate")} == {
        "mbo_i": 0.75,
        "mbo_c": 0.75,
        "miou": 0.75,
        "corloc": 1.0,
        "detection_rate": 0.5,
    }
    assert on["fg_ari"].item() == off["fg_ari"].item() == 0.0  # FG-ARI stays foreground-only
    assert on["miou_c"].item() == off["miou_c"].item() == 0.75  # miou_c always counts it


def test_background_segment_scores_images_without_objects_but_not_fully_ignored_ones():
    gt = torch.zeros(2, 1, 3, 4, dtype=torch.bool)
    pred = torch.zeros(2, 3, 4, dtype=torch.long)
    pred[:, 0, :] = 1  # slot 0 holds 8 of the 12 pixels
    ignore = torch.zeros(2, 3, 4, dtype=torch.bool)
    ignore[1] = True
    off = score_batch(pred, gt, ignore, gt, ObjectDiscoveryParams())
    on = score_batch(pred, gt, ignore, gt, GLASS)
    for name in ("mbo_i", "mbo_c", "miou", "corloc", "detection_rate"):
        assert off[name].isnan().all(), name
        assert on[name][1].isnan(), name  # nothing left to score
    assert on["mbo_i"][0].item() == on["miou"][0].item() == pytest.approx(8 / 12)
    assert on["corloc"][0].item() == on["detection_rate"][0].item() == 1.0


@pytest.mark.parametrize("seed", range(12))
def test_background_segment_is_the_background_as_first_gt_mask(seed):
    pred, gt, ignore = random_case(3000 + seed, overlaps=True)
    params = ObjectDiscoveryParams(class_masks=False)
    off = score_batch(pred, gt, ignore, None, params, num_slots=int(pred.max()) + 1)
    on = score_batch(pred, gt, ignore, None, ObjectDiscoveryParams(background_segment=True))
    # off: the task's scores are OCLF's on the objects alone, bit for bit as before
    plain = all_metrics(pred, gt, ignore_overlaps(gt, ignore))
    for name in NAMES:
        torch.testing.assert_close(
            off["mbo_i" if name == "mbo" else name], plain[name], rtol=0, atol=0, equal_nan=True
        )
    # on: the reference on [pixels in no mask, *objects], overlaps ignored
    background = gt.sum(1, keepdim=True) == 0
    want = reference(pred, torch.cat([background, gt], 1), ignore_overlaps(gt, ignore))
    want["fg_ari"] = reference(pred, gt, ignore_overlaps(gt, ignore))["fg_ari"]
    assert_matches({("mbo" if k == "mbo_i" else k): v for k, v in on.items()}, want)
    assert torch.equal(with_background(gt)[:, 0], background[:, 0])


def test_default_task_scores_are_unchanged_by_the_new_param():
    pred, gt, ignore = random_case(4242, num_masks=4, overlaps=True)
    classes = gt[:, :2] | gt[:, 2:]
    got = score_batch(pred, gt, ignore, classes, ObjectDiscoveryParams(), num_slots=7)
    assert list(got) == ["fg_ari", "miou", "corloc", "detection_rate", "mbo_c", "miou_c", "mbo_i"]
    before = all_metrics(pred, gt, ignore_overlaps(gt, ignore), num_slots=7)
    assert torch.equal(got["mbo_c"], mbo(pred, classes, ignore))
    assert torch.equal(got["miou_c"], miou(pred, with_background(classes), ignore))
    assert torch.equal(got["mbo_i"], before["mbo"])
