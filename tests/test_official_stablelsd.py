"""ocl-bench's StableLSD path against the official latent-slot-diffusion code, when present.

Opt-in: point OCL_BENCH_LSD_REPO at a checkout of github.com/JindongJiang/latent-slot-diffusion.

Every expected value is the official code's own output on the same weights and inputs:

- slot attention and conditioning: the official `MultiHeadSTEVESA` (src/models/slot_attn.py,
  with the `src/models/utils.py` it imports) run on the same tokens and slot-init noise;
- the training step: the statements of train_lsd.py's training loop, from reading the batch
  to the loss (VAE latents x scaling factor, noise, timesteps, `unet(noisy, t, slots)`,
  v-prediction target, MSE), cut out of the file with `ast` and executed on the official
  slot attention and on a diffusers UNet/VAE rebuilt from the same config and weights, as
  train_lsd.py loads Stable Diffusion; ocl-bench's decoder forward and denoising loss get
  the official loop's noise and timesteps (the official loop draws its noise with
  `randn_like` of channels-last VAE latents, so a shared seed alone gives other noise);
- sampling: the statements of train_lsd.py's `log_validation` that build the validation
  pipeline (DPMSolverMultistep from the training scheduler's config, StableDiffusionPipeline
  without a text encoder) and its call (`prompt_embeds=slots`, 25 steps, guidance 1.0),
  also cut out with `ast`, against `decoder.generate` with the same generator.

All weights (slot attention, UNet, VAE, including every LayerNorm / GroupNorm) are moved
away from their initial values first, so a swapped or missing mapping fails. The Stable
Diffusion 2.1 weights are replaced by the tiny random UNet/VAE of `decoder.tiny` and the
scheduler by SD 2.1's scheduler config. Modules that break with today's packages are not
imported: `unet_with_pos.py` and `backbone.py` import `diffusers.models.unet_2d_condition`
/ `unet_2d_blocks`, gone in diffusers 0.42, and `distinctipy` (a colour-palette package
`utils.py` imports for visualisation) is an empty stub. Nothing of the official code is
copied here; it is imported or executed from the checkout.

    git clone https://github.com/JindongJiang/latent-slot-diffusion /tmp/lsd
    OCL_BENCH_LSD_REPO=/tmp/lsd python -m pytest tests/test_official_stablelsd.py
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocl_bench.api.contracts import Batch, Dims, Features, ModelOutput
from ocl_bench.decoders.latent_diffusion import (
    SD21_SCHEDULER,
    LatentDiffusionDecoder,
    LatentDiffusionParams,
)
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.importers.stablelsd import StableLSDLayout, map_state
from ocl_bench.objectives.denoising import DenoisingLoss, DenoisingParams
from tests.official_checkout import checkout_from_env, multihead_stevesa

REPO, pytestmark = checkout_from_env(
    "OCL_BENCH_LSD_REPO", "src/models/slot_attn.py", "github.com/JindongJiang/latent-slot-diffusion"
)
B, K, D, SIDE, ITERS, WIDTH, IMAGE = 2, 4, 32, 4, 3, 24, 32


@pytest.fixture(scope="module")
def official_sa_class() -> type:
    return multihead_stevesa(REPO)


def _official_sa(cls: type, **extra: Any) -> nn.Module:
    """LSD's MultiHeadSTEVESA at this file's sizes (one head, as its configs)."""
    return cls(
        num_iterations=ITERS,
        num_slots=K,
        num_heads=1,
        input_size=D,
        out_size=WIDTH,
        slot_size=D,
        mlp_hidden_size=D,
        input_resolution=SIDE,
        **extra,
    )


def _move_away(module: nn.Module, seed: int) -> None:
    """Every weight off its initial value: norms away from 1/0, the rest jittered."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def models(official_sa_class) -> dict[str, Any]:
    """The official slot attention and ocl-bench's slot attention + decoder on its weights."""
    torch.manual_seed(1)
    official = _official_sa(official_sa_class, epsilon=1e-6)
    _move_away(official, 11)
    official.eval()
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
        Dims(image_size=(IMAGE, IMAGE), grid=(SIDE, SIDE), token_dim=D),
    )
    dec = LatentDiffusionDecoder(
        LatentDiffusionParams(tiny=True, tiny_width=WIDTH),
        Dims(image_size=(IMAGE, IMAGE), slot_dim=D, num_slots=K),
    )
    _move_away(dec.unet, 12)
    _move_away(dec.vae, 13)
    # the importer's own mapping (`ocl-bench import stablelsd`) of the official state_dict
    layout = StableLSDLayout(K, D, D, WIDTH, ITERS, "shared_gaussian", "none", SIDE, unet="")
    mapped = map_state(official.state_dict(), layout)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in mapped.items() if k.startswith(prefix)}

    sa.load_state_dict(part("grouping."), strict=True)
    dec.slot_proj.load_state_dict(part("decoder.slot_proj."), strict=True)
    sa.eval(), dec.eval()
    return {"official": official, "sa": sa, "dec": dec}


def _sd_like(dec: LatentDiffusionDecoder) -> tuple[nn.Module, nn.Module, Any]:
    """The UNet, VAE and DDPM scheduler as train_lsd.py loads them from a Stable Diffusion
    folder (from config + weights), separate objects from the decoder's."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(dec.unet.config)
    unet.load_state_dict(dec.unet.state_dict())
    vae = AutoencoderKL.from_config(dec.vae.config)
    vae.load_state_dict(dec.vae.state_dict())
    return unet.eval(), vae.eval(), DDPMScheduler(**SD21_SCHEDULER)


def _train_lsd() -> ast.Module:
    return ast.parse((Path(REPO) / "train_lsd.py").read_text())


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"train_lsd.py has no {name}()"
    return found[0]


def _training_step_source() -> ast.Module:
    """train_lsd.py's loop body from `pixel_values = batch[...]` to the loss."""
    main = _function(_train_lsd(), "main")
    loops = [
        n
        for n in ast.walk(main)
        if isinstance(n, ast.For) and ast.unparse(n.target) in ("(step, batch)", "step, batch")
    ]
    assert len(loops) == 1, "train_lsd.py: expected one `for step, batch in ...` loop"
    body: list[ast.stmt] = []
    for stmt in loops[0].body:
        body.append(stmt)
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "args.snr_gamma is None":
            break
    else:
        raise AssertionError("train_lsd.py: the loss (`if args.snr_gamma is None:`) not found")
    return ast.Module(body=body, type_ignores=[])


def _validation_source() -> tuple[ast.Module, ast.expr]:
    """log_validation's statements from `scheduler_args = {}` to `pipeline = ...(...)`, and the
    expression that samples the images (`pipeline(prompt_embeds=slots, ...).images`)."""
    fn = _function(_train_lsd(), "log_validation")
    texts = [ast.unparse(s) for s in fn.body]
    start = next(i for i, t in enumerate(texts) if t.startswith("scheduler_args = {}"))
    stop = next(
        i for i, t in enumerate(texts) if t.startswith("pipeline = StableDiffusionPipeline")
    )
    call = [
        n.value
        for n in ast.walk(fn)
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "images_gen"
    ]
    assert len(call) == 1, "train_lsd.py: log_validation has no `images_gen = pipeline(...)`"
    return ast.Module(body=fn.body[start : stop + 1], type_ignores=[]), call[0]


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(B, SIDE * SIDE, D, generator=torch.Generator().manual_seed(seed))
    return tokens, tokens.transpose(1, 2).reshape(B, D, SIDE, SIDE)  # raster -> [B, D, h, w]


def test_its_saved_slot_attention_is_not_taken_for_glass(official_sa_class, tmp_path) -> None:
    """LSD's own save_pretrained writes no init_mlp (GLASS's does), so `ocl-bench import
    stablelsd` names the stablelsd protocol for it (importers/stablelsd.py `method_of`)."""
    from ocl_bench.importers.stablelsd import method_of, read_config

    official = _official_sa(official_sa_class)
    official.save_pretrained(tmp_path / "ckpt" / "multiheadstevesa")
    weights = tmp_path / "ckpt" / "multiheadstevesa" / "diffusion_pytorch_model.safetensors"
    assert method_of(read_config(weights), weights) == "stablelsd"


def test_slot_attention_and_conditioning_match_the_official_code(models) -> None:
    official, sa, dec = models["official"], models["sa"], models["dec"]
    tokens, grid = _tokens(2)
    with torch.no_grad():
        torch.manual_seed(3)  # the same slot-init noise for both
        off_slots, off_attn = official(grid[:, None])  # [B,1,K,W], [B,1,heads,N,K]
        torch.manual_seed(3)
        slots = sa(Features(tokens=tokens, grid=(SIDE, SIDE)))
        cond = dec.condition(slots.slots)
    torch.testing.assert_close(cond, off_slots[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slots.attn, off_attn[:, 0].sum(1), rtol=1e-5, atol=1e-6)


def test_training_step_matches_train_lsd_loop(models, monkeypatch) -> None:
    """Latents, noisy input, UNet prediction, v-target and loss of ocl-bench's decoder and
    objective equal those train_lsd.py's own loop statements compute."""
    official, sa, dec = models["official"], models["sa"], models["dec"]
    unet, vae, noise_scheduler = _sd_like(dec)
    tokens, grid = _tokens(4)
    images = torch.rand(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    ns: dict[str, Any] = {
        "torch": torch,
        "F": F,
        "batch": {"pixel_values": images * 2 - 1, "pixel_values_vit": images},
        "weight_dtype": torch.float32,
        "vae": vae,
        "unet": unet,
        "noise_scheduler": noise_scheduler,
        "backbone": lambda pixel_values_vit: grid,  # the frozen DINOv2's feature grid
        # the slot-init noise from a known seed, so ocl-bench's grouping can draw the same
        "slot_attn": lambda feat: (torch.manual_seed(10), official(feat))[1],
        "train_unet": False,
        "args": argparse.Namespace(
            offset_noise=False, backbone_config="pretrain_dino", snr_gamma=None
        ),
    }
    torch.manual_seed(6)  # the VAE posterior sample is the first draw of the loop
    with torch.no_grad():
        exec(compile(_training_step_source(), "train_lsd.py", "exec"), ns)
    assert ns["noise_scheduler"].config.prediction_type == "v_prediction"

    with torch.no_grad():
        torch.manual_seed(6)
        latents = dec.encode_latents(images)
        torch.testing.assert_close(latents, ns["model_input"], rtol=1e-5, atol=1e-5)
        # the official loop's noise and timesteps go into ocl-bench's forward
        monkeypatch.setattr(torch, "randn_like", lambda x, **kw: ns["noise"].to(x))
        monkeypatch.setattr(
            "ocl_bench.decoders.diffusion.sample_timesteps", lambda *a, **kw: ns["timesteps"]
        )
        features = Features(tokens=tokens, grid=(SIDE, SIDE))
        torch.manual_seed(10)
        slots = sa(features)
        torch.testing.assert_close(dec.condition(slots.slots), ns["slots"], rtol=1e-5, atol=1e-5)
        torch.manual_seed(6)
        out = dec(slots, features, Batch(images=images))
        monkeypatch.undo()
        model_out = ModelOutput(features=features, slots=slots, decoding=out)
        loss = DenoisingLoss(DenoisingParams())(model_out, Batch(images=images))["denoising"]
    torch.testing.assert_close(out.extras["noisy"], ns["noisy_model_input"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prediction, ns["model_pred"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.target, ns["target"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ns["loss"], rtol=1e-5, atol=1e-6)
    assert ns["loss"].item() > 1e-3  # a real regression, not a trivially zero loss


def test_generation_matches_the_official_validation_pipeline(models) -> None:
    """decoder.generate equals the images train_lsd.py's log_validation pipeline samples
    from the same slots (25 DPM-Solver steps, guidance 1, same generator)."""
    pytest.importorskip("transformers")  # StableDiffusionPipeline's module imports it
    official, sa, dec = models["official"], models["sa"], models["dec"]
    unet, vae, scheduler = _sd_like(dec)
    tokens, grid = _tokens(7)
    with torch.no_grad():
        torch.manual_seed(8)
        slots = official(grid[:, None])[0][:, 0]  # [B, K, W]: the official conditioning
        torch.manual_seed(8)
        ours_slots = sa(Features(tokens=tokens, grid=(SIDE, SIDE)))
    build, call = _validation_source()
    diffusers = importlib.import_module("diffusers")
    ns: dict[str, Any] = {
        "scheduler": scheduler,
        "vae": vae,
        "unet": unet,
        "importlib": importlib,
        "StableDiffusionPipeline": diffusers.StableDiffusionPipeline,
        "args": argparse.Namespace(
            validation_scheduler="DPMSolverMultistepScheduler", resolution=IMAGE
        ),
    }
    exec(compile(build, "train_lsd.py", "exec"), ns)
    ns["pipeline"].set_progress_bar_config(disable=True)
    ns.update(slots=slots, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = eval(compile(ast.Expression(call), "train_lsd.py", "eval"), ns)
        ours = dec.generate(
            ours_slots,
            steps=25,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(9),
        )
    assert expected.shape == ours.shape == (B, 3, IMAGE, IMAGE)
    assert expected.std() > 1e-3  # not a constant image
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
