"""SlotDiffusion: its VQ-VAE tokenizer, the slot-conditioned UNet decoder, both stages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ocl_bench.api.contracts import Batch, Dims, Slots
from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.api.params import build_params
from ocl_bench.decoders.slotdiffusion import SlotDiffusionDecoder, SlotDiffusionParams
from ocl_bench.image_tokenizers.slotdiffusion_vqvae import (
    SlotDiffusionVQVAE,
    SlotDiffusionVQVAEParams,
)
from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.run import checkpoint
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import load_config, read_toml
from ocl_bench.run.grid import load_grid, run_grid
from ocl_bench.run.store import ResultStore
from tests.conftest import TINY_MODEL
from tests.test_cli_errors import cli, user_error
from tests.test_presets import SMOKE

TINY_VQ = {"channels": 16, "channel_mult": [1, 2], "layers_per_block": 1, "norm_groups": 8}


def tiny_vqvae(**values: object) -> SlotDiffusionVQVAE:
    params = build_params(SlotDiffusionVQVAEParams, {**TINY_VQ, "codebook_size": 32, **values}, "t")
    return SlotDiffusionVQVAE(params)


def tiny_decoder(**values: object) -> SlotDiffusionDecoder:
    params = build_params(SlotDiffusionParams, {"tiny": True, "vqvae": "random", **values}, "d")
    return SlotDiffusionDecoder(params, Dims(image_size=(32, 32), slot_dim=16, num_slots=3))


def slots(seed: int = 0, b: int = 2) -> Slots:
    g = torch.Generator().manual_seed(seed)
    return Slots(slots=torch.randn(b, 3, 16, generator=g), attn=torch.rand(b, 64, 3, generator=g))


def test_vqvae_ids_are_nearest_codebook_vectors_and_decode_like_the_latents() -> None:
    torch.manual_seed(0)
    vq = tiny_vqvae().eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        latents = vq.latents(images)
        ids = vq.encode(images)
        assert latents.shape == (2, 3, 16, 16) and ids.shape == (2, 16, 16)
        assert vq.grid((32, 32)) == (16, 16) and vq.vocab_size == 32
        codebook = vq.model.quantize.embedding.weight  # [V, C]
        flat = latents.permute(0, 2, 3, 1).reshape(-1, 3)
        nearest = torch.cdist(flat, codebook).argmin(1)
        assert torch.equal(ids.flatten(), nearest)
        embedded = vq.embed(ids)
        assert torch.allclose(embedded, codebook[ids].permute(0, 3, 1, 2))
        assert torch.allclose(embedded, vq.quantize(latents))
        decoded = vq.decode(ids)
        assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
        # decoding latents quantises them first (the official sampling path)
        assert torch.allclose(decoded, vq.decode_latents(latents), atol=1e-4)
        assert not torch.allclose(latents, embedded)  # the diffused latents are pre-quantisation


def test_vqvae_training_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    vq = tiny_vqvae()
    images = torch.rand(4, 3, 16, 16)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    totals = []
    for _ in range(15):
        losses = vq.losses(images)
        assert set(losses) == {"vqvae_recon", "vqvae_quant"}
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total))
    assert totals[-1] < 0.8 * totals[0], totals


def to_official(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """This tokenizer's keys renamed to the official taming layout (VQVAE.py/modules.py
    names: down.{level}.block.{i}, up.{level} numbered by resolution, mid.attn_1 convs)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(
            r"(encoder)\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", new
        ):
            part, lvl, kind, i, rest = m.groups()
            mid = f"block.{i}" if kind == "resnets" else "downsample"
            new = f"{part}.down.{lvl}.{mid}.{rest}"
        elif m := re.match(r"(decoder)\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", new):
            part, lvl, kind, i, rest = m.groups()
            mid = f"block.{i}" if kind == "resnets" else "upsample"
            new = f"{part}.up.{levels - 1 - int(lvl)}.{mid}.{rest}"
        elif m := re.match(r"(\w+)\.mid_block\.resnets\.(\d)\.(.*)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(\w+)(?:\.0)?\.(weight|bias)", new):
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
            name["to_out"] = "proj_out"
            new = f"{m[1]}.mid.attn_1.{name[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # taming's 1x1 convolutions
        out[new] = value
    return out


def test_an_official_layout_checkpoint_loads_and_gives_the_same_images(tmp_path) -> None:
    torch.manual_seed(0)
    source = tiny_vqvae(channel_mult=[1, 2, 4]).eval()
    official = to_official(source.model.state_dict(), 3)
    assert "decoder.up.0.block.1.conv1.weight" in official  # the full-resolution level
    assert (
        "encoder.mid.attn_1.q.weight" in official
        and "encoder.down.1.downsample.conv.weight" in official
    )
    official["loss.perceptual_loss.net.lin0.weight"] = torch.zeros(
        1
    )  # dropped, as the official wrapper does
    path = tmp_path / "vqvae_coco_params-res224.pth"
    torch.save({"state_dict": official}, path)
    torch.manual_seed(1)
    loaded = tiny_vqvae(channel_mult=[1, 2, 4], checkpoint=str(path)).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), source.encode(images))
        assert torch.allclose(
            loaded.decode_latents(loaded.latents(images)),
            source.decode_latents(source.latents(images)),
        )
    with pytest.raises(DataError, match="VQ-VAE checkpoint not found: .*nothing.pth"):
        tiny_vqvae(checkpoint=str(tmp_path / "nothing.pth"))
    del official["decoder.up.0.block.1.conv1.weight"]
    torch.save(official, path)
    with pytest.raises(
        DataError, match="missing keys .*decoder.up_blocks.2.resnets.1.conv1.weight"
    ):
        tiny_vqvae(channel_mult=[1, 2, 4], checkpoint=str(path))


def test_the_noise_schedule_is_ldm_linear_and_the_target_is_the_noise() -> None:
    dec = tiny_decoder().train()
    # SlotDiffusion's make_beta_schedule("linear"): linspace(sqrt(start), sqrt(end), T) ** 2
    official = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(dec.scheduler.betas.double(), official, atol=1e-8)
    assert dec.scheduler.config.prediction_type == "epsilon"
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    out = dec(slots(), None, Batch(images=images))
    assert out.kind == "epsilon" and out.timesteps.shape == (2,)
    torch.manual_seed(3)
    latents = dec.latents(images)
    noise = torch.randn_like(latents)
    assert torch.equal(out.target, noise)
    assert out.prediction.shape == latents.shape == (2, 3, 16, 16)
    assert torch.allclose(latents, dec.vqvae.latents(images))  # pre-quantisation, scale 1


def test_slots_condition_the_unet_and_gradients_reach_slot_attention_only(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            "decoder.name=slotdiffusion",
            "decoder.tiny=true",
            "decoder.vqvae=random",
            "objectives={denoising={}}",
            'tasks={object_discovery={masks=["attn"]}}',
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg, (32, 32)).train()
    batch = Batch(images=torch.rand(2, 3, 32, 32))
    out = model(batch)
    loss = (out.decoding.prediction - out.decoding.target).pow(2).mean()
    loss.backward()
    grouping_grads = [p.grad for p in model.grouping.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grouping_grads)
    assert all(p.grad is None and not p.requires_grad for p in model.decoder.vqvae.parameters())
    # the same noisy latents under other slots give another prediction
    dec = model.decoder.eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        a = dec.denoise(x, t, out.slots.slots)
        b = dec.denoise(x, t, out.slots.slots.flip(0))
    assert (a - b).abs().max() > 1e-4
    # param groups: the UNet and null slots at dec_lr = 2 x lr, as the official optimiser
    (group,) = dec.param_groups()
    assert group["lr_scale"] == 2.0 and any(p is dec.null_slots for p in group["params"])


def test_generation_is_seeded_in_unit_range_and_guided_by_the_null_slots() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    s = slots()
    first = dec.generate(s, steps=3, generator=torch.Generator().manual_seed(7))
    again = dec.generate(s, steps=3, generator=torch.Generator().manual_seed(7))
    other = dec.generate(s, steps=3, generator=torch.Generator().manual_seed(8))
    assert first.shape == (2, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    guided = dec.generate(
        s, steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(7)
    )
    assert not torch.equal(first, guided)


def test_cached_latents_equal_computed_ones_and_skip_the_vqvae(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OCL_BENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    dec = tiny_decoder(cache_latents=True).eval()
    images = torch.rand(3, 3, 32, 32)
    first = dec.latents(images[:2])  # two computed and stored
    assert torch.allclose(first, dec.vqvae.latents(images[:2]))
    calls = []
    original = dec.vqvae.latents
    monkeypatch.setattr(dec.vqvae, "latents", lambda x: calls.append(len(x)) or original(x))
    again = dec.latents(images)  # two from disk, only the new one computed
    assert calls == [1]
    assert torch.equal(again[:2], first)
    assert torch.allclose(again[2:], original(images[2:]), atol=1e-6)


def test_quantize_x0_makes_every_x0_estimate_a_codebook_vector() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([400])
    with torch.no_grad():
        eps = dec._quantized_x0(x, t, slots(b=1).slots)
    abar = dec.scheduler.alphas_cumprod[400]
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    flat = x0.permute(0, 2, 3, 1).reshape(-1, 3)
    codebook = dec.vqvae.model.quantize.embedding.weight
    assert torch.cdist(flat, codebook).min(1).values.max() < 1e-4


def test_the_diffusion_stage_without_its_vqvae_fails_in_one_line(tmp_path) -> None:
    base = ["--out", str(tmp_path / "run"), *TINY_MODEL, "decoder.name=slotdiffusion"]
    base += ["decoder.tiny=true", "objectives={denoising={}}", "train.steps=1"]
    base += ['tasks={object_discovery={masks=["attn"]}}']
    missing = tmp_path / "no-such-run"
    user_error(cli(tmp_path, "train", *base, f"decoder.vqvae={missing}"), str(missing))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="decoder.vqvae: .*slotdiffusion-vqvae-coco"):
        tiny_decoder(vqvae="")
    with pytest.raises(ConfigError, match="names the run of preset 'slotdiffusion-vqvae-coco'"):
        tiny_decoder(vqvae="@slotdiffusion-vqvae-coco")


# The SlotDiffusion row at tiny scale: shapes, a random 2-block ViT-S/8 stand-in at 64 px,
# the tiny VQ-VAE and UNet, two steps per stage, 20 sampling steps on 4 images.
TINY_SD = [*SMOKE, "eval.num_images=4", "eval.batch_size=4", "eval.figure_images=1"]
TINY_SD += ["decoder.tiny=true"]


def test_the_slotdiffusion_row_trains_its_vqvae_stage_first_and_fills_the_table(tmp_path) -> None:
    grid = load_grid("thesis-table-5-1", TINY_SD)
    cells = [c for c in grid.cells if "lotDiffusion" in c.label or "slotdiffusion" in c.label]
    assert [c.label for c in cells] == [
        "@slotdiffusion-vqvae-coco [shapes]",
        "SlotDiffusion [coco as shapes]",
    ]
    stage1, stage2 = cells
    assert stage2.needs == {"decoder.vqvae": stage1}
    assert stage1.config.decoder.params.stage == "vqvae"
    assert [o.name for o in stage1.config.objectives] == ["tokenizer_loss"]
    grid.cells[:] = cells
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    assert set(run_grid(grid, db, runs, progress=False).values()) == {"complete"}

    store = ResultStore(db)
    s1, s2 = (store.get(c.config.digest()) for c in cells)
    used = read_toml(Path(s2.run_dir) / "config.toml")["decoder"]["vqvae"]
    assert Path(used) == Path(s1.run_dir).resolve()
    # stage 2 froze the stage-1 VQ-VAE it loaded: its checkpoint keeps a hash, not a copy
    w1 = load_file(checkpoint.recover(Path(s1.run_dir) / "checkpoint") / checkpoint.MODEL_FILE)
    w2_path = checkpoint.recover(Path(s2.run_dir) / "checkpoint") / checkpoint.MODEL_FILE
    assert any(k.startswith("decoder.vqvae.") for k in w1)
    assert not any(k.startswith("decoder.vqvae.") for k in load_file(w2_path))
    assert "decoder.vqvae" in checkpoint.stored_frozen_hashes(w2_path)

    board = load_leaderboard("thesis-table-5-1", db, overrides=TINY_SD)
    row = next(r for r in board.rows if r.label == "SlotDiffusion")
    assert row.missing is None
    for key in ("fg_ari", "mbo_i", "mbo_c"):
        assert row.measured[key] == pytest.approx(100 * s2.value("object_discovery", key, "attn"))
    psnr = s2.value("conditional_generation", "psnr", None)
    assert psnr is not None and psnr > 0


def test_a_stage_one_run_without_a_vqvae_is_refused(tmp_path) -> None:
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    save_file({"decoder.mlp.weight": torch.zeros(1)}, str(ckpt / checkpoint.MODEL_FILE))
    (ckpt / checkpoint.DONE_FILE).write_text("1")
    with pytest.raises(DataError, match="holds no SlotDiffusion VQ-VAE"):
        tiny_decoder(vqvae=str(tmp_path / "run"))


def _ldm_sqrt_alphas_bar(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SlotDiffusion's DDPM.register_schedule, 'linear' (LDM): betas = linspace(sqrt(0.0015),
    sqrt(0.0195), 1000) ** 2 in float64; buffers sqrt(alphas_bar), sqrt(1 - alphas_bar)."""
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    return ab.sqrt().float()[t], (1 - ab).sqrt().float()[t]


def test_given_noise_and_timesteps_give_the_official_ldm_loss() -> None:
    """LDM.loss_function: t = randint(0, T, (B,)), then noise = randn_like(x0);
    x_t = sqrt_alphas_bar[t] x0 + sqrt_one_minus_alphas_bar[t] noise;
    loss = mse(unet(x_t, t, context=slots), noise)."""
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    s = slots()
    images = torch.rand(2, 3, 32, 32)
    x0 = dec.latents(images)
    torch.manual_seed(4)  # the official order: t first, then the noise
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn_like(x0)
    out = dec(s, None, Batch(images=images), noise=noise, timesteps=t)
    loss = (out.prediction - out.target).pow(2).mean()  # the denoising objective's MSE
    a, b = _ldm_sqrt_alphas_bar(t)
    x_t = a[:, None, None, None] * x0 + b[:, None, None, None] * noise
    with torch.no_grad():
        expected = F.mse_loss(dec.unet(x_t, t, encoder_hidden_states=s.slots).sample, noise)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.target, noise) and torch.equal(out.timesteps, t)


def test_default_draws_are_noise_then_timesteps_and_given_latents_skip_the_vqvae() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder().eval()
    s, images = slots(), torch.rand(2, 3, 32, 32)
    torch.manual_seed(6)
    drawn = dec(s, None, Batch(images=images))
    torch.manual_seed(6)
    latents = dec.latents(images)  # deterministic: draws nothing
    noise = torch.randn_like(latents)  # forward's documented order: noise, then t
    t = torch.randint(0, 1000, (2,))
    assert torch.equal(drawn.target, noise) and torch.equal(drawn.timesteps, t)
    # given latents: the VQ-VAE is not run (images of the wrong size do not matter)
    given = dec(
        s, None, Batch(images=torch.zeros(2, 3, 4, 4)), latents=latents, noise=noise, timesteps=t
    )
    assert torch.equal(given.prediction, drawn.prediction)
    with pytest.raises(ConfigError, match="no diffusion step"):
        tiny_decoder(stage="vqvae")(s, None, Batch(images=images), noise=noise)
