"""ocl-bench's SPOT against the official code (github.com/gkakogeorgiou/spot), when present.

Opt-in: point OCL_BENCH_SPOT_REPO at a checkout of the official repository (it needs
`einops`, which ocl-bench does not). The official SPOT model is built around a tiny timm
ViT laid out like DINO's hub model, its state_dict is saved as train_spot.py saves it,
imported with `import_spot`, and both models run on the same images:
A_slot, A_dec, reconstruction, slots, logits, the training loss and every clipped
gradient must agree. Nothing of the official code is copied here; it is imported.

    git clone https://github.com/gkakogeorgiou/spot /tmp/spot && pip install einops
    OCL_BENCH_SPOT_REPO=/tmp/spot python -m pytest tests/test_official_spot.py
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from ocl_bench.api.contracts import Batch, Progress
from ocl_bench.importers.spot import import_spot, inspect, map_state
from ocl_bench.run.compose import build_objectives
from ocl_bench.run.evaluate import load_run
from tests.official_checkout import dino_hub_like_vit

REPO = os.environ.get("OCL_BENCH_SPOT_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "spot.py").is_file(),
    reason="set OCL_BENCH_SPOT_REPO to a checkout of github.com/gkakogeorgiou/spot",
)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VIT = ["encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2"]
VIT += ["encoder.image_size=64", "dataset.image_size=64"]


@pytest.fixture(scope="module")
def official():
    pytest.importorskip("einops")
    sys.path.insert(0, REPO)
    try:
        import spot
        import utils_spot
    finally:
        sys.path.remove(REPO)
    return spot, utils_spot


def _dino_like_vit() -> nn.Module:
    return dino_hub_like_vit(img_size=64, embed_dim=32, depth=2, num_heads=2)


def _official_model(spot_module, stage: int, eval_order: str, train_order: str, seed: int):
    torch.manual_seed(seed)
    args = argparse.Namespace(
        which_encoder="dino_vitb16",
        encoder_final_norm=False,
        img_channels=3,
        image_size=64,
        num_iterations=3,
        num_slots=5,
        slot_size=24,
        mlp_hidden_size=48,
        pos_channels=4,
        truncate="none" if stage == 1 else "bi-level",
        init_method="shared_gaussian" if stage == 1 else "embedding",
        cappa=-1,
        train_permutations=train_order,
        eval_permutations=eval_order,
        dec_type="transformer",
        use_slot_proj=True,
        num_dec_blocks=3,
        max_tokens=16,
        num_heads=4,
        dropout=0.0,
        num_cross_heads=None,
        mlp_dec_hidden=64,
        finetune_blocks_after=1 if stage == 2 else 100,
    )
    second = _dino_like_vit() if stage == 2 else None
    model = spot_module.SPOT(_dino_like_vit(), args, second)
    with torch.no_grad():  # move every weight off its init, so nothing agrees by accident
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.add_(torch.randn_like(p) * 0.2)
    return model, args


def _import(model, args, tmp_path: Path, stage: int, overrides: list[str]):
    path = tmp_path / "checkpoint.pt.tar"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1}, path)
    over = [*VIT, f"encoder.finetune_from={1 if stage == 2 else -1}", *overrides]
    import_spot(path, tmp_path / "run", over, num_slots=args.num_slots, num_heads=args.num_heads)
    return load_run(tmp_path / "run")


def _as_ours(official_map: torch.Tensor) -> torch.Tensor:
    """Official (B, K, h, w) attention maps as ocl-bench's (B, N, K)."""
    return official_map.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("order", ["standard", "all"])
def test_eval_forward_matches_the_official_spot(official, tmp_path, stage, order) -> None:
    spot_module, _ = official
    model, args = _official_model(spot_module, stage, order, "random", seed=stage)
    _, ours, _ = _import(model, args, tmp_path, stage, [f"decoder.eval_order={order}"])
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(123)  # the stage-1 Gaussian slot noise is drawn the same way
    with torch.no_grad():
        _, a_slot, a_dec, slots, recon, logits = model.eval()((images - MEAN) / STD)
    torch.manual_seed(123)
    with torch.no_grad():
        out = ours.eval()(Batch(images=images))
    close = partial(torch.testing.assert_close, atol=1e-5, rtol=1e-4)
    close(out.slots.attn, _as_ours(a_slot))
    close(out.slots.slots, slots)
    close(out.slots.logits, logits)
    close(out.decoding.masks, _as_ours(a_dec))
    close(out.decoding.reconstruction, recon)


def test_training_step_matches_the_official_spot(official, tmp_path) -> None:
    spot_module, _ = official
    # train order 'all' makes the official step deterministic (no python-random order)
    model, args = _official_model(spot_module, 1, "all", "all", seed=5)
    cfg, ours, _ = _import(model, args, tmp_path, 1, ["decoder.train_order=all"])
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    mse = model.train()((images - MEAN) / STD)[0]
    mse.backward()
    norm_official = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3, "inf")
    torch.manual_seed(7)
    out = ours.train()(Batch(images=images))
    batch = Batch(images=images)
    loss = sum(t for o in build_objectives(cfg) for t in o(out, batch, Progress(0, 1)).values())
    loss.backward()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    norm = cfg.train.grad_clip_norm
    norm_ours = torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip, norm)
    torch.testing.assert_close(loss, mse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm_ours, norm_official, atol=1e-6, rtol=1e-5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    layout, _ = inspect(state, num_slots=args.num_slots)
    grads, _ = map_state(ours, state, layout, "dino_vitb16")  # official grads, our names
    named = dict(ours.named_parameters())
    compared = 0
    for key, grad in grads.items():
        if not key.startswith("encoder.") and named.get(key) is not None:
            torch.testing.assert_close(named[key].grad, grad, atol=1e-6, rtol=1e-4)
            compared += 1
    assert compared == sum(1 for k in named if not k.startswith("encoder."))


def test_self_training_matching_and_loss_match_the_official(official) -> None:
    import torch.nn.functional as F

    from ocl_bench.objectives.spot_self_training import match_slots

    _, utils_spot = official
    g = torch.Generator().manual_seed(0)
    b, k, h = 4, 6, 5
    for trial in range(100):
        teacher = torch.randint(0, k - trial % 3, (b, h, h), generator=g)  # some slots empty
        logits = torch.randn(b, k, h, h, generator=g) * 2
        student = logits.softmax(1).argmax(1)
        # train_spot_2.py: att_matching on one-hot masks, then logits re-ordered per image
        idx, _ = utils_spot.att_matching(
            F.one_hot(student, k).permute(0, 3, 1, 2), F.one_hot(teacher, k).permute(0, 3, 1, 2)
        )
        reordered = torch.stack([x[idx[n]] for n, x in enumerate(logits)])
        expected = F.cross_entropy(reordered, teacher)
        perm, _ = match_slots(student.flatten(1), teacher.flatten(1), k)
        assert perm.tolist() == idx.tolist()
        flat = logits.flatten(2).transpose(1, 2)
        ordered = torch.gather(flat, 2, perm[:, None, :].expand(b, h * h, k))
        ce = F.cross_entropy(ordered.transpose(1, 2), teacher.flatten(1))
        torch.testing.assert_close(ce, expected)


def test_cosine_schedule_matches_the_official(official) -> None:
    from ocl_bench.run.config import load_config
    from ocl_bench.run.train import lr_factor

    _, utils_spot = official
    steps, epochs, warmup_epochs = 600, 12, 2  # 50 iterations an epoch
    expected = utils_spot.cosine_scheduler(4e-4, 4e-7, epochs, 50, warmup_epochs, 0)
    over = ["train.schedule=cosine", f"train.steps={steps}", "train.warmup_steps=100"]
    t = load_config(None, [*over, "train.lr=4e-4", "train.min_lr=4e-7"]).train
    got = [t.lr * lr_factor(t, s) for s in range(steps)]
    assert got == pytest.approx(list(expected), rel=1e-9, abs=1e-15)
