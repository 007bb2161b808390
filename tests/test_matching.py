"""ocl_bench.api.matching: IoU matrices and Hungarian matching shared by metrics, probe and SPOT."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ocl_bench.api.matching import hungarian_match, label_overlap, mask_iou, mask_overlap


def _grid(*rows: str) -> torch.Tensor:
    """bool[H,W] from strings of '0'/'1'."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


LEFT = _grid("1100", "1100", "1100", "1100")  # 8 pixels
TOP = _grid("1111", "1111", "0000", "0000")  # 8 pixels, 4 shared with LEFT
CORNER = _grid("0000", "0000", "0000", "0001")  # 1 pixel, disjoint from LEFT
EMPTY = torch.zeros(4, 4, dtype=torch.bool)


def test_hard_masks_give_the_hand_counted_ious() -> None:
    a = torch.stack([LEFT, TOP, EMPTY])[None]
    b = torch.stack([TOP, LEFT, CORNER, EMPTY])[None]
    iou = mask_iou(a, b)
    expected = torch.tensor(
        [
            [4 / 12, 1.0, 0.0, 0.0],  # LEFT: 4 shared of 12 with TOP, itself, disjoint, empty
            [1.0, 4 / 12, 0.0, 0.0],  # TOP: CORNER is in row 3, outside TOP
            [0.0, 0.0, 0.0, 0.0],  # an empty mask has IoU 0 with everything, even another
        ],
        dtype=torch.float64,
    )
    assert iou.dtype == torch.float64  # bool masks count exactly
    torch.testing.assert_close(iou, expected[None], rtol=0, atol=1e-15)
    overlap = mask_overlap(a, b)
    assert overlap.area_a.tolist() == [[8, 8, 0]]
    assert overlap.area_b.tolist() == [[8, 8, 1, 0]]
    assert overlap.union[0, 0, 0].item() == 12


def test_soft_masks_count_their_mass() -> None:
    half = torch.full((1, 1, 4), 0.5)  # mass 2 over four pixels
    pair = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])  # mass 2 on two of them
    overlap = mask_overlap(half, pair)
    assert overlap.inter.item() == pytest.approx(1.0)  # 0.5 + 0.5
    assert mask_iou(half, pair).item() == pytest.approx(1 / 3)  # 1 / (2 + 2 - 1)
    # Mass of the product, so a soft mask is not its own perfect match: 1 / (2 + 2 - 1).
    assert mask_iou(half, half).item() == pytest.approx(1 / 3)


def test_ignored_pixels_leave_both_sets() -> None:
    a = torch.stack([LEFT, TOP])[None]
    b = torch.stack([LEFT | CORNER, TOP & ~_grid("1000", "0000", "0000", "0000")])[None]
    ignore = (CORNER | _grid("1000", "0000", "0000", "0000"))[None]
    # Without the ignore mask the sets differ on two pixels; with it they are equal.
    assert mask_iou(a, b)[0].diagonal().lt(1).all()
    iou = mask_iou(a, b, ignore)
    assert iou[0].diagonal().tolist() == [1.0, 1.0]
    overlap = mask_overlap(a, b, ignore)
    assert overlap.area_a.tolist() == [[7, 7]]  # the ignored corner pixel of LEFT and TOP
    assert overlap.area_b.tolist() == [[7, 7]]
    labels = torch.where(LEFT, 0, 1)[None]  # two labels: LEFT and the rest
    counted = label_overlap(labels, b, ignore)
    # label 0 (LEFT, corner ignored) holds all 7 of b's LEFT and 3 of its TOP; label 1 the rest
    assert counted.inter[0].tolist() == [[7, 3], [0, 4]]


def test_soft_iou_is_differentiable_even_with_empty_masks() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    a[0, 1] = 0  # an empty mask: union 0 against the empty one in b
    b = torch.rand(2, 4, 5, generator=g, dtype=torch.float64)
    b[:, 2] = 0
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(mask_iou, (a, b))


@pytest.mark.parametrize("seed", range(6))
def test_label_overlap_equals_dense_counts_of_one_hot_labels(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, labels_count, masks_count, h, w = 3, 5, 11 + seed, 6, 7  # more masks than a byte
    labels = torch.randint(0, labels_count - 1, (batch, h, w), generator=g)  # last label unused
    masks = torch.rand(batch, masks_count, h, w, generator=g) < 0.3
    masks[:, -2:] = False  # padding
    ignore = torch.rand(batch, h, w, generator=g) < 0.2
    one_hot = F.one_hot(labels, labels_count).permute(0, 3, 1, 2)
    dense = mask_overlap(one_hot, masks, ignore)
    for max_bins in (1 << 20, 16):  # one histogram pass, and many
        counted = label_overlap(labels, masks, ignore, labels_count, max_bins=max_bins)
        for name in ("inter", "area_a", "area_b"):
            assert torch.equal(getattr(counted, name), getattr(dense, name)), name
        assert torch.equal(counted.iou(), dense.iou())


def test_label_overlap_rejects_labels_it_cannot_count() -> None:
    masks = torch.stack([LEFT])[None]
    with pytest.raises(ValueError, match="negative"):
        label_overlap(torch.full((1, 4, 4), -1), masks)
    with pytest.raises(ValueError, match="num_labels=2"):
        label_overlap(torch.full((1, 4, 4), 2), masks, num_labels=2)
    with pytest.raises(TypeError):
        label_overlap(torch.zeros(1, 4, 4), masks)
    with pytest.raises(ValueError, match="does not match"):
        label_overlap(torch.zeros(1, 4, 3, dtype=torch.long), masks)
    with pytest.raises(ValueError):
        mask_overlap(masks, torch.stack([LEFT])[None, :, :3])


def _brute_force_best(matrix: np.ndarray, maximize: bool) -> float:
    k, m = matrix.shape
    if k <= m:
        totals = [matrix[range(k), cols].sum() for cols in itertools.permutations(range(m), k)]
    else:
        totals = [matrix[rows, range(m)].sum() for rows in itertools.permutations(range(k), m)]
    return max(totals) if maximize else min(totals)


@pytest.mark.parametrize("maximize", [False, True])
def test_matching_equals_brute_force_over_permutations(maximize: bool) -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        k, m = (int(x) for x in rng.integers(1, 6, size=2))
        scores = rng.random((2, k, m)).round(1)  # rounding makes ties
        for matrix, (rows, cols) in zip(scores, hungarian_match(scores, maximize=maximize)):
            assert len(rows) == min(k, m)
            assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
            assert matrix[rows, cols].sum() == pytest.approx(_brute_force_best(matrix, maximize))


def test_padding_is_never_matched_and_indices_refer_to_the_full_matrix() -> None:
    rng = np.random.default_rng(5)
    scores = rng.random((3, 4, 5))
    valid_cols = np.array([[1, 0, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    valid_rows = np.array([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=bool)
    scores[~np.broadcast_to(valid_cols[:, None, :], scores.shape)] = 100.0  # would win if used
    scores[~np.broadcast_to(valid_rows[:, :, None], scores.shape)] = 100.0
    matches = hungarian_match(
        torch.from_numpy(scores), maximize=True, valid_rows=valid_rows, valid_cols=valid_cols
    )
    for i, (rows, cols) in enumerate(matches):
        assert valid_rows[i][rows].all() and valid_cols[i][cols].all()
        assert len(rows) == min(valid_rows[i].sum(), valid_cols[i].sum())
        sub = scores[i][np.ix_(valid_rows[i], valid_cols[i])]
        if sub.size:
            assert scores[i][rows, cols].sum() == pytest.approx(_brute_force_best(sub, True))
    assert len(matches[1].rows) == 0  # an image whose masks are all padding matches nothing
    with pytest.raises(ValueError, match="valid_cols"):
        hungarian_match(scores, valid_cols=valid_cols[:, :4])


def test_minimising_cost_of_iou_matches_slots_to_their_own_masks() -> None:
    """A permuted copy of a partition is matched back to the permutation, with either sign."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (2, 30), generator=g)
    labels[:, :4] = torch.arange(4)  # every label used
    shuffle = torch.tensor([2, 0, 3, 1])
    a = F.one_hot(labels, 4).transpose(1, 2).float()
    b = F.one_hot(shuffle[labels], 4).transpose(1, 2).float()
    iou = mask_iou(a, b)
    for matches in (hungarian_match(1 - iou), hungarian_match(iou, maximize=True)):
        for rows, cols in matches:
            assert rows.tolist() == [0, 1, 2, 3] and cols.tolist() == shuffle.tolist()
