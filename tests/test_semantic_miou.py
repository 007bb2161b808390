"""object_discovery's miou_c: GLASS's mIoU, slots matched one-to-one to semantic classes."""

from __future__ import annotations

import torch
from torch import nn

from ocl_bench.api.contracts import Batch, Features, ModelOutput, ReconstructionOutput, Slots
from ocl_bench.api.tasking import EvalContext
from ocl_bench.run.registry import registry
from ocl_bench.tasks.object_discovery import ObjectDiscovery, ObjectDiscoveryParams

K = 6  # up to 4 shape classes and the background, one spare


class ClassOracle(nn.Module):
    """Slot c covers exactly the pixels of class mask c; the background is the last slot."""

    def forward(self, batch: Batch) -> ModelOutput:
        b, _, h, w = batch.images.shape
        classes = batch.class_masks.flatten(2).float()  # [B,C,N]
        attn = torch.zeros(b, h * w, K)
        attn[:, :, : classes.shape[1]] = classes.transpose(1, 2)
        attn[:, :, K - 1] = (classes.sum(1) == 0).float()
        x = batch.images.flatten(2)
        return ModelOutput(
            features=Features(tokens=x.transpose(1, 2), grid=(h, w)),
            slots=Slots(slots=torch.zeros(b, K, 3), attn=attn),
            decoding=ReconstructionOutput(reconstruction=x, target=x),
        )


def test_class_oracle_scores_one_on_semantic_masks_not_on_instances():
    shapes = registry().get("dataset", "shapes")
    two_kinds = ["square", "circle"]
    params = shapes.Params(
        image_size=32, val_size=8, min_objects=3, max_objects=5, shapes=two_kinds
    )
    data = shapes(params, "val")
    ctx = EvalContext(
        model=ClassOracle(),
        dataset=lambda split: data,
        split="val",
        num_images=8,
        batch_size=4,
        device=torch.device("cpu"),
        progress=False,
    )
    task = ObjectDiscovery(ObjectDiscoveryParams(masks=["attn"], ignore_overlaps=False))
    scores = {r.metric: r.value for r in task.evaluate(ctx).records}
    assert scores["miou_c"] == 1.0 and scores["mbo_c"] == 1.0
    # 3-5 objects of 2 shapes: some share a class, so one slot holds several instances
    assert scores["miou"] < 1.0
