"""ocl-bench's StableLSD path against the official latent-slot-diffusion code, when present.

Opt-in: point OCL_BENCH_LSD_REPO at a checkout of github.com/JindongJiang/latent-slot-diffusion.
Only `src/models/slot_attn.py` (MultiHeadSTEVESA) and the `src/models/utils.py` it imports
are loaded. Modules that break with today's packages are not imported: `unet_with_pos.py`
and `backbone.py` import `diffusers.models.unet_2d_condition` / `unet_2d_blocks`, gone in
diffusers 0.42, and `distinctipy` (a colour-palette package `utils.py` imports for its
visualisation helpers) is replaced by an empty stub. Nothing of the official code is
copied here; it is imported.

The official MultiHeadSTEVESA (Cartesian position code, LN + MLP on the inputs, 1-head slot
attention, output LayerNorm + Linear to the cross-attention width) and ocl-bench's
slot_attention(position='cartesian', pre_mlp=true) + latent_diffusion slot projection run
on the same weights and the same slot-init noise: the conditioning passed to the UNet, the
last-iteration attention (the masks StableLSD evaluates) and the UNet's prediction agree.

    git clone https://github.com/JindongJiang/latent-slot-diffusion /tmp/lsd
    OCL_BENCH_LSD_REPO=/tmp/lsd python -m pytest tests/test_official_stablelsd.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ocl_bench.contracts import Dims, Features
from ocl_bench.decoders.latent_diffusion import LatentDiffusionDecoder, LatentDiffusionParams
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.importers.stablelsd import StableLSDLayout, map_state
from tests.official_checkout import checkout_on_path

REPO = os.environ.get("OCL_BENCH_LSD_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "src" / "models" / "slot_attn.py").is_file(),
    reason="set OCL_BENCH_LSD_REPO to a checkout of github.com/JindongJiang/latent-slot-diffusion",
)
B, K, D, SIDE, ITERS, WIDTH = 2, 4, 32, 4, 3, 24


@pytest.fixture(scope="module")
def official_sa_class() -> type:
    pytest.importorskip("einops")
    # distinctipy: only used by utils.random_colors (visualisation), never called here
    with checkout_on_path(REPO, stubs=("distinctipy",)):
        from src.models.slot_attn import MultiHeadSTEVESA
    return MultiHeadSTEVESA


def _ours() -> tuple[SlotAttention, LatentDiffusionDecoder]:
    torch.manual_seed(0)
    sa = SlotAttention(
        SlotAttentionParams(
            num_slots=K,
            slot_dim=D,
            iterations=ITERS,
            mlp_hidden=D,
            pre_mlp=True,
            position="cartesian",
            eps=1e-6,
        ),
        Dims(image_size=(32, 32), grid=(SIDE, SIDE), token_dim=D),
    )
    dec = LatentDiffusionDecoder(
        LatentDiffusionParams(tiny=True, tiny_width=WIDTH),
        Dims(image_size=(32, 32), slot_dim=D, num_slots=K),
    )
    return sa, dec


def _official_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The official MultiHeadSTEVESA state_dict as (slot_attention, slot_proj) state dicts,
    through the importer's own mapping (`ocl-bench import stablelsd`)."""
    layout = StableLSDLayout(K, D, D, WIDTH, ITERS, "shared_gaussian", "none", SIDE, unet="")
    mapped = map_state(state, layout)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in mapped.items() if k.startswith(prefix)}

    return part("grouping."), part("decoder.slot_proj.")


def test_slot_attention_and_conditioning_match_the_official_code(official_sa_class) -> None:
    torch.manual_seed(1)
    official = official_sa_class(
        num_iterations=ITERS,
        num_slots=K,
        num_heads=1,
        input_size=D,
        out_size=WIDTH,
        slot_size=D,
        mlp_hidden_size=D,
        input_resolution=SIDE,
        epsilon=1e-6,
    ).eval()
    sa, dec = _ours()
    sa_state, proj_state = _official_to_ours(official.state_dict())
    sa.load_state_dict(sa_state, strict=True)
    dec.slot_proj.load_state_dict(proj_state, strict=True)
    sa.eval(), dec.eval()

    tokens = torch.randn(B, SIDE * SIDE, D, generator=torch.Generator().manual_seed(2))
    grid = tokens.transpose(1, 2).reshape(B, D, SIDE, SIDE)  # raster order -> [B, D, h, w]
    with torch.no_grad():
        torch.manual_seed(3)  # the same slot-init noise for both
        off_slots, off_attn = official(grid[:, None])  # [B,1,K,W], [B,1,heads,N,K]
        torch.manual_seed(3)
        slots = sa(Features(tokens=tokens, grid=(SIDE, SIDE)))
        cond = dec.condition(slots.slots)
    torch.testing.assert_close(cond, off_slots[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slots.attn, off_attn[:, 0].sum(1), rtol=1e-5, atol=1e-6)

    # the official train loop: unet(noisy_latents, timesteps, slots).sample
    x, t = torch.randn(B, 4, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        official_pred = dec.unet(x, t, off_slots[:, 0]).sample
        torch.testing.assert_close(dec.denoise(x, t, cond), official_pred, rtol=1e-4, atol=1e-5)
