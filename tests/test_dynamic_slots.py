"""StableLSD-Dynamic (GLASS Fig. 4a): as many attending slots as the image has objects."""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.contracts import Batch, Dims, Features
from ocl_bench.api.errors import IncompatiblePluginsError
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.run.compose import SlotModel, check_compatible
from ocl_bench.run.config import load_config


def _batch(objects: list[int], side: int = 8) -> Batch:
    masks = torch.zeros(len(objects), max(objects), side, side, dtype=torch.bool)
    for b, m in enumerate(objects):
        for i in range(m):
            masks[b, i, i, :] = True  # object i: row i
    return Batch(images=torch.zeros(len(objects), 3, side, side), instance_masks=masks)


def test_only_as_many_slots_as_objects_attend_and_train():
    torch.manual_seed(0)
    params = SlotAttentionParams(num_slots=4, slot_dim=16, mlp_hidden=16, dynamic_slots=True)
    grouping = SlotAttention(params, Dims(image_size=(8, 8), grid=(4, 4), token_dim=8))
    assert grouping.reads_batch
    features = Features(tokens=torch.randn(3, 16, 8), grid=(4, 4))
    batch = _batch([1, 2, 6])  # 6 objects but 4 slots: all 4 attend
    batch.instance_masks[0, 0] = False  # an image without objects still keeps one slot
    slots = grouping(features, batch)
    used = slots.attn.sum(1) > 0  # [B,K]
    assert used.tolist() == [[True, False, False, False], [True, True, False, False], [True] * 4]
    torch.testing.assert_close(slots.attn.sum(-1), torch.ones(3, 16))
    slots.attn[:, :, 1].sum().backward()
    assert grouping.to_q.weight.grad is not None and grouping.to_q.weight.grad.abs().sum() > 0
    everyone = grouping(features)  # no batch (e.g. a teacher's pass): every slot attends
    assert (everyone.attn.sum(1) > 0).all()


def test_composed_model_hands_the_batch_and_the_dataset_must_have_objects():
    torch.manual_seed(0)
    params = SlotAttentionParams(num_slots=3, slot_dim=16, mlp_hidden=16, dynamic_slots=True)
    grouping = SlotAttention(params, Dims(image_size=(8, 8), grid=(4, 4), token_dim=8))

    class Tokens(torch.nn.Module):
        def forward(self, batch: Batch) -> Features:
            return Features(tokens=torch.randn(batch.size, 16, 8), grid=(4, 4))

    class NoDecoder(torch.nn.Module):
        def forward(self, slots, features, batch):
            return slots

    out = SlotModel(Tokens(), grouping, NoDecoder())(_batch([1, 1]))
    assert (out.decoding.attn.sum(1) > 0).sum().item() == 2  # one slot per image
    check_compatible(load_config(None, ["grouping.dynamic_slots=true"]))  # shapes has objects
    with pytest.raises(IncompatiblePluginsError, match="batch.instance_masks"):
        check_compatible(  # an image folder has no objects to count
            load_config(None, ["dataset.name=image_folder", "grouping.dynamic_slots=true"])
        )


def test_slots_initialised_from_boxes():
    """StableLSD-BBox Init: slot k starts from an MLP of box k (GLASS's bbox_mlp)."""
    torch.manual_seed(0)
    params = SlotAttentionParams(  # box_frame=0: boxes as fractions of the image
        num_slots=3, slot_dim=16, mlp_hidden=16, init="boxes", box_frame=0
    )
    grouping = SlotAttention(params, Dims(image_size=(8, 8), grid=(4, 4), token_dim=8))
    features = Features(tokens=torch.randn(2, 16, 8), grid=(4, 4))
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 4.0, 8.0], [0.0, 0.0, 0.0, 0.0]],  # one object, a collate padding row
            [[0.0, 0.0, 8.0, 4.0], [0.0, 4.0, 8.0, 8.0]],  # two objects
        ]
    )
    slots = grouping(features, Batch(images=torch.zeros(2, 3, 8, 8), boxes=boxes))
    mlp = grouping.box_mlp
    pad = mlp(torch.full((4,), -1.0))  # slots past the last object: GLASS pads with -1
    torch.testing.assert_close(slots.init[0, 0], mlp(torch.tensor([0.0, 0.0, 0.5, 1.0])))
    torch.testing.assert_close(slots.init[0, 1:], pad.expand(2, 16))
    torch.testing.assert_close(slots.init[1, 1], mlp(torch.tensor([0.0, 0.5, 1.0, 1.0])))
    torch.testing.assert_close(slots.init[1, 2], pad)
    slots.slots.sum().backward()
    assert grouping.box_mlp[0].weight.grad.abs().sum() > 0
    needs, _ = SlotAttention.capabilities(params)
    assert "batch.boxes" in needs and grouping.reads_batch
    with pytest.raises(ValueError, match="needs the batch's boxes"):
        grouping(features)
