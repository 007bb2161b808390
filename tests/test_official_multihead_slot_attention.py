"""Multi-head slot attention (`grouping.num_heads`) against GLASS's released module, when present.

Opt-in: point OCL_BENCH_GLASS_REPO at a checkout of github.com/visinf/glass (it needs
`einops`); its `src/models/slot_attn.py` is StableLSD's MultiHeadSTEVESA plus GLASS's
dynamic slots and box init. `distinctipy` (visualisation only) is an empty stub. The
official module is built with num_heads > 1, its weights are moved off their initial
values, it is saved with its own `save_pretrained`, and that folder goes through
`ocl-bench import stablelsd` (importers/stablelsd.py): the imported run's slot attention
gives the official slots and the official attention summed over heads (what StableLSD's
eval.py reduces to masks) within 1e-5, also with GLASS's `num_objs` masking.

    git --git-dir=/work/.mirror/visinf+glass/repo archive HEAD | tar -x -C /tmp/glass
    OCL_BENCH_GLASS_REPO=/tmp/glass python -m pytest tests/test_official_multihead_slot_attention.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ocl_bench.api.contracts import Batch, Features
from ocl_bench.run.importing import make_importer
from tests.official_checkout import checkout_from_env, multihead_stevesa
from tests.test_import_stablelsd import TINY

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_GLASS_REPO", "src/models/slot_attn.py", "github.com/visinf/glass"
)
B, K, D, S, SIDE, ITERS, OUT = 3, 4, 32, 16, 4, 3, 32  # tokens D (TINY's encoder), slots S
close = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def official_sa_class() -> type:
    return multihead_stevesa(REPO)


def _imported(cls: type, heads: int, tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the official module, the slot attention of its `ocl-bench import stablelsd` run)."""
    torch.manual_seed(heads)
    official = cls(
        num_iterations=ITERS,
        num_slots=K,
        num_heads=heads,
        input_size=D,
        out_size=OUT,
        slot_size=S,
        mlp_hidden_size=2 * S,
        input_resolution=SIDE,
        epsilon=1e-6,
    ).eval()
    with torch.no_grad():  # off the init (LayerNorm 1/0 included)
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path / "ckpt" / "multiheadstevesa"
    official.save_pretrained(folder)
    weights = next(folder.glob("diffusion_pytorch_model.*"))
    result = make_importer("stablelsd").convert(weights, TINY)
    assert result.config.grouping.params.num_heads == heads
    return official, result.model.grouping.eval()


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(B, SIDE * SIDE, D, generator=torch.Generator().manual_seed(seed))
    return tokens, tokens.transpose(1, 2).reshape(B, 1, D, SIDE, SIDE)


@pytest.mark.parametrize("heads", [2, 4])
def test_multi_head_slots_and_attention_match_the_official(
    official_sa_class, heads: int, tmp_path: Path
) -> None:
    official, ours = _imported(official_sa_class, heads, tmp_path)
    tokens, grid = _tokens(heads + 10)
    with torch.no_grad():
        torch.manual_seed(3)  # the same Gaussian slot-init noise for both
        off_slots, off_attn = official.forward_slots(grid)  # [B,1,K,S], [B,1,H,N,K]
        torch.manual_seed(3)
        got = ours(Features(tokens=tokens, grid=(SIDE, SIDE)))
    assert off_attn.shape == (B, 1, heads, SIDE * SIDE, K)
    torch.testing.assert_close(got.slots, off_slots[:, 0], **close)
    torch.testing.assert_close(got.attn, off_attn[:, 0].sum(1), **close)
    # one head would not do: the per-head split matters on these weights
    ours.params = type(ours.params)(**{**vars(ours.params), "num_heads": 1})
    with torch.no_grad():
        torch.manual_seed(3)
        single = ours(Features(tokens=tokens, grid=(SIDE, SIDE)))
    assert not torch.allclose(single.slots, off_slots[:, 0], **close)


def test_multi_head_dynamic_slots_match_the_official_num_objs(
    official_sa_class, tmp_path: Path
) -> None:
    official, ours = _imported(official_sa_class, 2, tmp_path)
    ours.params = type(ours.params)(**{**vars(ours.params), "dynamic_slots": True})
    tokens, grid = _tokens(7)
    counts = [1, 2, K + 1]
    masks = torch.zeros(B, max(counts), 8, 8, dtype=torch.bool)
    for b, m in enumerate(counts):
        masks[b, :m, :m] = True  # row i of object i: non-empty
    batch = Batch(images=torch.zeros(B, 3, 8, 8), instance_masks=masks)
    with torch.no_grad():
        torch.manual_seed(5)
        off_slots, off_attn = official.forward_slots(
            grid, num_objs=torch.tensor(counts), use_mask=True
        )
        torch.manual_seed(5)
        got = ours(Features(tokens=tokens, grid=(SIDE, SIDE)), batch)
    torch.testing.assert_close(got.slots, off_slots[:, 0], **close)
    torch.testing.assert_close(got.attn, off_attn[:, 0].sum(1), **close)
