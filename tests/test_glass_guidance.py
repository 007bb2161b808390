"""The GLASS guidance loss: matching, BCE on matched slots, ignore pixels, gradients."""

from __future__ import annotations

import torch

from ocl_bench.api.contracts import (
    Batch,
    Dims,
    Features,
    ModelOutput,
    Progress,
    ReconstructionOutput,
)
from ocl_bench.objectives.glass_guidance import (
    GlassGuidance,
    GuidanceParams,
    box_masks,
    guidance_loss,
    segments,
)
from ocl_bench.run.registry import registry

GRID = (8, 8)


def _scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Two segments (left half rows 0-3, right half rows 4-7) and a background."""
    label = torch.zeros(8, 8, dtype=torch.long)
    label[:4, :4] = 1
    label[4:, 4:] = 2
    segs = torch.stack([label == 1, label == 2])[None]  # [1,2,8,8]
    return label, segs


def _attn(label: torch.Tensor, slot_of: list[int], k: int = 4, sharp: float = 30.0):
    """[1,N,K] softmax attention where pixels of label l go to slot slot_of[l]."""
    logits = torch.zeros(64, k)
    logits[torch.arange(64), torch.tensor(slot_of)[label.flatten()]] = sharp
    return logits.softmax(-1)[None]


def test_perfect_masks_give_zero_loss_and_a_permutation_the_same_loss():
    label, segs = _scene()
    ignored = torch.zeros(1, 8, 8, dtype=torch.bool)
    loss, pairs = guidance_loss(_attn(label, [0, 1, 2]), segs, ignored)
    assert pairs == 2 and loss.item() < 1e-5  # the clamp (1e-6) bounds it
    loss_perm, _ = guidance_loss(_attn(label, [3, 2, 0]), segs, ignored)
    torch.testing.assert_close(loss_perm, loss)
    blurred, _ = guidance_loss(_attn(label, [0, 1, 2], sharp=1.0), segs, ignored)
    wrong, _ = guidance_loss(_attn(label, [0, 0, 0]), segs, ignored)  # one slot for all
    assert blurred > 0.1 and wrong > blurred


def test_ignored_pixels_do_not_contribute():
    label, segs = _scene()
    ignored = torch.zeros(1, 8, 8, dtype=torch.bool)
    ignored[0, :2] = True
    attn = _attn(label, [0, 1, 2])
    base, _ = guidance_loss(attn, segs, ignored)
    noisy = attn.clone().view(1, 8, 8, 4)
    noisy[0, :2] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # garbage only where ignored
    changed = segs.clone()
    changed[0, :, :2] = ~changed[0, :, :2]
    loss, _ = guidance_loss(noisy.view(1, 64, 4), changed, ignored)
    torch.testing.assert_close(loss, base)
    unignored, _ = guidance_loss(noisy.view(1, 64, 4), changed, ignored & False)
    assert unignored > base + 0.1


def test_background_matched_only_when_asked():
    label, segs = _scene()
    batch = Batch(
        images=torch.zeros(1, 3, 16, 16),
        class_masks=segs.repeat_interleave(2, -1).repeat_interleave(2, -2),
        ignore_mask=torch.zeros(1, 16, 16, dtype=torch.bool),
    )
    without, _ = segments(batch, "pseudo_masks", GRID, background=False)
    with_bg, ignored = segments(batch, "pseudo_masks", GRID, background=True)
    assert without.shape[1] == 2 and with_bg.shape[1] == 3
    assert torch.equal(with_bg[0, 0], label == 0) and not ignored.any()
    attn = _attn(label, [0, 1, 2])
    _, pairs = guidance_loss(attn, with_bg, ignored)
    assert pairs == 3


def test_boxes_become_masks_at_the_slot_grid():
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 16.0]]])  # left half of a 16 px image
    masks = box_masks(boxes, (4, 4), (16, 16))
    assert masks.shape == (1, 1, 4, 4)
    assert masks[0, 0, :, :2].all() and not masks[0, 0, :, 2:].any()
    # a later box covers an earlier one where they overlap (GLASS paints one label map)
    both = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0]]])
    first, second = box_masks(both, (4, 4), (16, 16))[0]
    assert second[:2, :2].all() and second.sum() == 4
    assert not (first & second).any() and (first | second).all()


def test_gradient_reaches_slot_attention_and_capabilities_follow_the_source():
    cls = registry().get("grouping", "slot_attention")
    grouping = cls(
        cls.Params(num_slots=3, slot_dim=16, mlp_hidden=16),
        Dims(image_size=(16, 16), grid=GRID, token_dim=8),
    )
    torch.manual_seed(0)
    tokens = torch.randn(2, 64, 8)
    slots = grouping(Features(tokens=tokens, grid=GRID))
    label, segs = _scene()
    batch = Batch(
        images=torch.zeros(2, 3, 8, 8),
        class_masks=segs.repeat(2, 1, 1, 1),
        ignore_mask=torch.zeros(2, 8, 8, dtype=torch.bool),
    )
    out = ModelOutput(
        features=Features(tokens=tokens, grid=GRID),
        slots=slots,
        decoding=ReconstructionOutput(reconstruction=tokens, target=tokens),
    )
    objective = GlassGuidance(GuidanceParams(weight=2.0))
    loss = objective(out, batch, Progress(0, 1))["glass_guidance"]
    loss.backward()
    grads = [p.grad for p in grouping.parameters() if p.requires_grad]
    assert loss.item() > 0
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    needs, _ = GlassGuidance.capabilities(GuidanceParams())
    assert "batch.generated" in needs  # pseudo masks: generated images only
    needs_box, _ = GlassGuidance.capabilities(GuidanceParams(source="gt_boxes"))
    assert "batch.boxes" in needs_box and "batch.generated" not in needs_box
