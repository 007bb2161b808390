"""SPOT stage 2: self-training of slot attention on a frozen teacher's decoder masks.

As the official train_spot_2.py does it (../shared/reference/spot-and-mage.md, section d):

1. A frozen stage-1 model (the teacher) runs in eval mode on the batch, decoding in one
   random patch order per batch (`teacher_order`); its hard masks are the argmax over
   slots of its decoder attention A_dec.
2. The student's hard masks are the argmax over slots of its slot-attention A_slot.
3. Per image, teacher and student slots are matched by the Hungarian algorithm on the
   cost 1 - IoU, with every pair of an empty teacher slot costing `empty_cost` (1e3),
   so empty teacher slots are matched last, to whatever student slots remain.
4. The loss is the cross-entropy of the student's last-iteration slot-attention logits
   (Slots.logits), re-ordered by the matching, against the teacher's labels, times a
   weight (5e-3), optionally cosine-scheduled to `final_weight` over the whole training
   (the trainer's step and train.steps, as the official per-iteration schedule).

The student should be a fresh stage-2 model (SPOT re-initialises it, it is not a copy of
the teacher) with `grouping.init = "learned_queries"` and `grouping.truncation =
"bi-level"`, trained with the reconstruction objective beside this one; the SPOT stage-2
preset sets these. The teacher uses shared Gaussian init, as in stage 1, so its masks
are stochastic even in eval mode (as in the official code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.contracts import Batch, ModelOutput, Progress
from ocl_bench.api.errors import ConfigError
from ocl_bench.api.hookspecs import hookimpl
from ocl_bench.api.matching import hungarian_match, mask_overlap
from ocl_bench.api.params import param
from ocl_bench.api.plugin import ConformanceRun, Objective
from ocl_bench.decoders.spot_ar import TINY_SPOT_RUN


@dataclass(frozen=True)
class SpotSelfTrainingParams:
    teacher: str = param(
        "",
        "run directory of the frozen stage-1 teacher (spot_ar decoder); in a grid, '@PRESET'"
        " trains that preset on the same dataset first and uses its run",
    )
    weight: float = param(5e-3, "weight of the cross-entropy (official ce_weight)", ge=0)
    final_weight: float | None = param(
        None,
        "if set, the weight follows a cosine from `weight` to this over train.steps"
        " (final_ce_weight)",
        ge=0,
    )
    teacher_order: Literal["random", "standard", "all"] = param(
        "random", "teacher decoding order: one random order per batch (official), raster, all"
    )
    empty_cost: float = param(1e3, "matching cost of every pair with an empty teacher slot", ge=0)


def match_slots(
    student: Tensor, teacher: Tensor, num_slots: int, empty_cost: float = 1e3
) -> tuple[Tensor, Tensor]:
    """Hungarian matching of hard masks, as SPOT's `att_matching`.

    student, teacher: long[B,N] slot ids. Returns (perm long[B,K], iou float[B,K,K]):
    perm[b, t] is the student slot matched to teacher slot t; iou[b, t, s] is the IoU
    of teacher slot t and student slot s. Cost 1 - IoU; rows of empty teacher slots cost
    `empty_cost` (rather than being left out), so they take the student slots left over
    and every teacher slot gets a student slot.
    """
    # float32 one-hot masks, as the official code: the costs, so the matchings, are its own
    overlap = mask_overlap(
        F.one_hot(teacher, num_slots).transpose(1, 2).float(),
        F.one_hot(student, num_slots).transpose(1, 2).float(),
    )
    iou = overlap.iou()
    cost = 1.0 - iou
    cost[overlap.area_a == 0] = empty_cost
    perm = np.stack([matching.cols for matching in hungarian_match(cost)])
    return torch.as_tensor(perm, device=student.device, dtype=torch.long), iou


def cosine_weight(start: float, end: float, step: int, total: int) -> float:
    """SPOT's per-iteration cosine schedule (utils_spot.cosine_scheduler, no warm-up)."""
    if total <= 0:
        return start
    step = min(step, total - 1)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total))


class SpotSelfTraining(nn.Module, Objective):
    """SPOT self-training: cross-entropy of slot-attention logits on teacher A_dec masks."""

    kind = "objective"
    name = "spot_self_training"
    Params = SpotSelfTrainingParams
    # Student and teacher: the tiny spot_ar run; the teacher is an untrained run of it.
    conformance = {
        **TINY_SPOT_RUN,
        "grouping.init": "learned_queries",
        "objectives": {
            "reconstruction": {},
            "spot_self_training": {"teacher": ConformanceRun(TINY_SPOT_RUN)},
        },
    }
    requires = frozenset({"slots.logits", "slots.attn", "decoding.masks"})

    def __init__(self, params: SpotSelfTrainingParams, teacher: nn.Module | None = None):
        super().__init__()
        self.params = params
        if teacher is None:
            if not params.teacher:
                raise ConfigError(
                    "objectives.spot_self_training.teacher: give the run directory of a "
                    "trained stage-1 SPOT model (the teacher)"
                )
            if params.teacher.startswith("@"):
                raise ConfigError(
                    f"objectives.spot_self_training.teacher = '{params.teacher}' names the run"
                    f" of preset '{params.teacher[1:]}', which only `ocl-bench grid` trains"
                    " first; run this config through a grid or give a run directory"
                )
            from ocl_bench.run.evaluate import load_run

            _, teacher, _ = load_run(params.teacher)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        # Kept out of the module tree: not trained, not in this objective's state_dict
        # (so checkpoints do not carry a second copy of the encoder), moved lazily.
        self._teacher = [teacher]

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def current_weight(self, progress: Progress) -> float:
        p = self.params
        if p.final_weight is None:
            return p.weight
        return cosine_weight(p.weight, p.final_weight, progress.step, progress.total)

    @torch.no_grad()
    def teacher_labels(self, batch: Batch) -> tuple[Tensor, int]:
        """(long[B,N] argmax over slots of the teacher's A_dec, the teacher's K)."""
        teacher = self.teacher
        device = batch.images.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        features = teacher.encoder(batch)
        slots = teacher.grouping(features)
        decoder = teacher.decoder
        if hasattr(decoder, "decode") and hasattr(decoder, "order_ids"):
            ids = decoder.order_ids(self.params.teacher_order)
            targets = features.targets
            if targets is None:
                raise ValueError("the teacher's encoder provides no targets")
            _, masks = decoder.decode(slots.slots, targets, ids, features.grid)
        else:
            masks = decoder(slots, features, batch).masks
            if masks is None:
                raise ValueError("the teacher's decoder produces no masks (A_dec)")
        return masks.argmax(dim=-1), int(masks.shape[-1])

    def forward(self, out: ModelOutput, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        logits = out.slots.logits
        if logits is None:
            raise ValueError("spot_self_training needs the grouping's attention logits")
        labels, teacher_k = self.teacher_labels(batch)
        b, n, k = logits.shape
        if labels.shape != (b, n):
            raise ValueError(
                f"teacher masks {tuple(labels.shape)} do not match the student's {(b, n)}"
            )
        if teacher_k != k:
            raise ValueError(f"teacher has {teacher_k} slots, the student {k}")
        student = out.slots.attn.detach().argmax(dim=-1)
        perm, _ = match_slots(student, labels, k, self.params.empty_cost)
        # channel t of the re-ordered logits is the student slot matched to teacher slot t
        ordered = torch.gather(logits, 2, perm[:, None, :].expand(b, n, k))
        ce = F.cross_entropy(ordered.float().transpose(1, 2), labels)
        return {"spot_ce": self.current_weight(progress) * ce}


@hookimpl
def ocl_bench_plugins() -> list[type]:
    return [SpotSelfTraining]


__all__ = ["SpotSelfTraining", "SpotSelfTrainingParams", "cosine_weight", "match_slots"]
