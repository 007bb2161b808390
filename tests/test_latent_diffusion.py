"""StableLSD's latent_diffusion decoder and the shared diffusion helpers, on tiny stand-ins."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from safetensors import safe_open

from ocl_bench.api.contracts import Batch, Dims, Features, Progress, Slots
from ocl_bench.api.errors import DataError
from ocl_bench.cli import main
from ocl_bench.decoders import diffusion
from ocl_bench.decoders.latent_diffusion import (
    SD21_SCHEDULER,
    LatentDiffusionDecoder,
    LatentDiffusionParams,
    tiny_models,
)
from ocl_bench.groupings.slot_attention import SlotAttention, SlotAttentionParams
from ocl_bench.objectives.denoising import DenoisingLoss, DenoisingParams
from ocl_bench.run import checkpoint
from ocl_bench.run.compose import build_model, build_objectives
from ocl_bench.run.config import load_config
from ocl_bench.run.data import make_dataset
from ocl_bench.run.store import ResultStore
from ocl_bench.tasks import fid as fidlib
from tests.test_cli_errors import cli, user_error

# The tiny model of the default config with StableLSD's decoder and loss.
TINY_LSD = [
    "dataset.image_size=32",
    "dataset.val_size=4",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "encoder.dim=16",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=16",
    "grouping.position=cartesian",
    "decoder.name=latent_diffusion",
    "decoder.tiny=true",
    "objectives={denoising={}}",
    'tasks={object_discovery={masks=["attn"]}}',
]
K, DS = 3, 16


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def no_stable_diffusion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $OCL_BENCH_SD and an empty Hugging Face cache."""
    monkeypatch.delenv("OCL_BENCH_SD", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def _decoder(seed: int = 0, **params: object) -> LatentDiffusionDecoder:
    torch.manual_seed(seed)
    dims = Dims(image_size=(32, 32), grid=(8, 8), token_dim=8, slot_dim=DS, num_slots=K)
    return LatentDiffusionDecoder(LatentDiffusionParams(tiny=True, **params), dims)


def _inputs(b: int = 2, seed: int = 0) -> tuple[Slots, Features, Batch]:
    g = torch.Generator().manual_seed(seed)
    slots = Slots(slots=torch.randn(b, K, DS, generator=g), attn=torch.full((b, 64, K), 1 / K))
    feats = Features(tokens=torch.randn(b, 64, 8, generator=g), grid=(8, 8))
    return slots, feats, Batch(images=torch.rand(b, 3, 32, 32, generator=g))


def _alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """SD's 'scaled_linear' schedule from its definition: betas = linspace(sqrt(b0),
    sqrt(b1), 1000) ** 2, alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t].float()


def test_sd21_scheduler_settings_equal_the_official_ones(tmp_path: Path) -> None:
    # reference section 1: DDPMScheduler.from_pretrained(SD 2.1, subfolder="scheduler"):
    # 1000 steps, scaled_linear 0.00085-0.012, v_prediction
    official = {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
    }
    assert {k: SD21_SCHEDULER[k] for k in official} == official
    tiny = _decoder()
    assert {k: tiny.scheduler.config[k] for k in official} == official
    assert tiny.kind_predicted == "v_prediction"
    # SD 2.1's folder holds a DDIMScheduler config; LSD reads it as DDPM: same schedule
    DDIMScheduler(**official, set_alpha_to_one=False, steps_offset=1).save_pretrained(
        tmp_path / "scheduler"
    )
    loaded = DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    t = torch.tensor([0, 499, 999])
    torch.testing.assert_close(loaded.alphas_cumprod[t], _alpha_bar(t))
    torch.testing.assert_close(tiny.scheduler.alphas_cumprod[t], _alpha_bar(t))
    # the sampler keeps the schedule and the prediction type
    solver = diffusion.make_solver(tiny.scheduler)
    assert isinstance(solver, DPMSolverMultistepScheduler)
    assert solver.config.prediction_type == "v_prediction"
    torch.testing.assert_close(solver.alphas_cumprod[t], _alpha_bar(t))


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_target_is_what_the_scheduler_config_predicts(kind: str) -> None:
    dec = _decoder(prediction_type=kind)
    slots, feats, batch = _inputs()
    out = dec(slots, feats, batch)
    assert out.kind == kind and out.prediction.shape == out.target.shape == (2, 4, 16, 16)
    x0, xt = out.extras["latents"], out.extras["noisy"]
    ab = _alpha_bar(out.timesteps)[:, None, None, None]
    noise = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()  # x_t = sqrt(ab) x0 + sqrt(1-ab) eps
    expected = noise if kind == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(out.target, expected, rtol=1e-3, atol=1e-3)
    # latents are the VAE's, scaled by its scaling factor (0.18215 by default)
    assert dec.scaling_factor == pytest.approx(0.18215)


def test_slots_condition_the_unet_and_gradients_skip_the_frozen_parts() -> None:
    dec = _decoder()
    slots, _, _ = _inputs()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    a = dec.denoise(x, t, dec.condition(slots.slots))
    b = dec.denoise(x, t, dec.condition(slots.slots.flip(0)))
    assert (a - b).abs().max() > 1e-4

    cfg = load_config(None, TINY_LSD)
    data = make_dataset(cfg.dataset, "val")
    torch.manual_seed(0)
    model = build_model(cfg, data.image_size)
    objectives = build_objectives(cfg)
    batch = data.collate([data[i] for i in range(2)])
    out = model(batch)
    objectives[0](out, batch, Progress(0, 1))["denoising"].backward()
    grouping_grads = [p.grad for p in model.grouping.parameters()]
    assert all(g is not None for g in grouping_grads)
    assert model.grouping.to_q.weight.grad.abs().sum() > 0
    assert model.grouping.pos_proj.weight.grad.abs().sum() > 0
    assert model.decoder.slot_proj[1].weight.grad.abs().sum() > 0
    for frozen in (model.decoder.unet, model.decoder.vae):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert checkpoint.frozen_modules(model) == ["decoder.unet", "decoder.vae"]


def test_frozen_unet_and_vae_are_stored_as_hashes(tmp_path: Path) -> None:
    cfg = load_config(None, TINY_LSD)
    torch.manual_seed(0)
    model = build_model(cfg, (32, 32))
    checkpoint.save(tmp_path / "ck", model, {"step": 0}, frozen=checkpoint.frozen_hashes(model))
    with safe_open(str(tmp_path / "ck" / checkpoint.MODEL_FILE), "pt") as f:
        keys = list(f.keys())
        frozen = json.loads(f.metadata()["frozen"])
    assert set(frozen) == {"decoder.unet", "decoder.vae"}
    assert not any(k.startswith(("decoder.unet.", "decoder.vae.")) for k in keys)
    assert "decoder.slot_proj.1.weight" in keys
    torch.manual_seed(1)  # the stand-ins come from their own seed: the hashes match
    again = build_model(cfg, (32, 32))
    checkpoint.load_into(again, tmp_path / "ck" / checkpoint.MODEL_FILE)
    other = build_model(cfg, (32, 32))
    with torch.no_grad():  # other frozen weights: refused, naming the module
        next(other.decoder.unet.parameters()).add_(1)
    with pytest.raises(DataError, match="decoder.unet"):
        checkpoint.load_into(other, tmp_path / "ck" / checkpoint.MODEL_FILE)


def test_generation_is_seeded_and_guidance_one_is_the_conditional_prediction() -> None:
    dec = _decoder(cond_drop_prob=0.5).eval()
    with torch.no_grad():
        dec.null_embedding.normal_()  # a trained null condition differs from the slots
    slots, _, _ = _inputs()

    def gen(seed: int, scale: float) -> torch.Tensor:
        return dec.generate(
            slots, steps=3, guidance_scale=scale, generator=torch.Generator().manual_seed(seed)
        )

    first = gen(0, 2.0)
    assert first.shape == (2, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    torch.testing.assert_close(gen(0, 2.0), first, rtol=0, atol=0)
    assert not torch.equal(gen(1, 2.0), first)
    assert not torch.equal(gen(0, 1.0), first)
    # guidance 1: the conditional branch alone (no null condition, one UNet batch of B)
    batches: list[int] = []
    real_denoise = dec.denoise

    def counting(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batches.append(x.shape[0])
        return real_denoise(x, t, cond)

    cond = dec.condition(slots.slots)
    shape = (2, 4, 16, 16)
    with torch.no_grad():
        cond_only = diffusion.sample_latents(
            counting, dec.scheduler, cond, None, shape, 3, 7.0, torch.Generator().manual_seed(0)
        )
        guided_one = diffusion.sample_latents(
            counting,
            dec.scheduler,
            cond,
            dec.null_embedding,
            shape,
            3,
            1.0,
            torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(guided_one, cond_only, rtol=0, atol=0)
    assert batches == [2] * 6
    batches.clear()
    with torch.no_grad():
        diffusion.sample_latents(
            counting, dec.scheduler, cond, dec.null_embedding, shape, 3, 2.0, torch.Generator()
        )
    assert batches == [4] * 3  # null and conditional branches in one batch


def test_guidance_and_condition_dropout_arithmetic() -> None:
    cond = torch.randn(4, K, 8)
    null = torch.randn(K, 8)

    def linear(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + c.mean(1)[:, :, None, None].expand_as(x)

    x, t = torch.randn(4, 8, 2, 2), torch.zeros(4, dtype=torch.long)
    out = diffusion.guided(linear, x, t, cond, null, 3.0)
    uncond, conditional = linear(x, t, null.expand_as(cond)), linear(x, t, cond)
    torch.testing.assert_close(out, uncond + 3.0 * (conditional - uncond))
    assert diffusion.drop_conditions(cond, null, 0.0) is cond
    dropped = diffusion.drop_conditions(cond, null, 1.0)
    torch.testing.assert_close(dropped, null.expand_as(cond))
    half = diffusion.drop_conditions(cond, null, 0.5, torch.Generator().manual_seed(3))
    rows = [torch.equal(half[i], null) or torch.equal(half[i], cond[i]) for i in range(4)]
    assert all(rows)


def test_learned_null_condition_trains_only_with_condition_dropout() -> None:
    slots, feats, batch = _inputs()
    for p, trained in ((0.0, False), (1.0, True)):
        dec = _decoder(cond_drop_prob=p).train()
        out = dec(slots, feats, batch)
        (out.prediction - out.target).pow(2).mean().backward()
        grad = dec.null_embedding.grad
        assert (grad is not None and grad.abs().sum() > 0) == trained
        # every sample dropped: the slots get no gradient
        assert (dec.slot_proj[1].weight.grad.abs().sum() > 0) != trained


def test_missing_stable_diffusion_fails_in_one_line_naming_three_places(
    no_stable_diffusion: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError) as err:
        LatentDiffusionDecoder(
            LatentDiffusionParams(), Dims(image_size=(32, 32), slot_dim=DS, num_slots=K)
        )
    msg = str(err.value)
    assert "\n" not in msg
    for place in ("decoder.pretrained", "$OCL_BENCH_SD", "stabilityai/stable-diffusion-2-1"):
        assert place in msg
    assert str(no_stable_diffusion) in msg
    # through the command: exit 2 and that one line
    run = cli(
        tmp_path,
        "train",
        *[o for o in TINY_LSD if o != "decoder.tiny=true"],
        "train.steps=1",
        "--out",
        str(tmp_path / "run"),
    )
    assert run.returncode == 2
    user_error(run, "decoder.pretrained", "OCL_BENCH_SD", "stable-diffusion-2-1")
    assert not (tmp_path / "run").exists()


def _save_sd_folder(root: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(5)
    unet, vae = tiny_models(32, 16, 32)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    DDPMScheduler(**{**SD21_SCHEDULER, "prediction_type": "epsilon"}).save_pretrained(
        root / "scheduler"
    )
    return unet, vae


def test_a_diffusers_folder_loads_through_pretrained_and_the_env_var(
    no_stable_diffusion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet, vae = _save_sd_folder(tmp_path / "sd")
    dims = Dims(image_size=(32, 32), slot_dim=DS, num_slots=K)
    dec = LatentDiffusionDecoder(LatentDiffusionParams(pretrained=str(tmp_path / "sd")), dims)
    for mine, saved in ((dec.unet, unet), (dec.vae, vae)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), saved.state_dict().items()):
            assert torch.equal(a, b), name
    assert dec.kind_predicted == "epsilon"  # the folder's scheduler says so
    assert dec.null_kind == "learned"  # no text encoder in the folder
    assert dec.slot_proj[1].out_features == 32  # the UNet's cross-attention width
    monkeypatch.setenv("OCL_BENCH_SD", str(tmp_path / "sd"))
    from_env = LatentDiffusionDecoder(LatentDiffusionParams(), dims)
    assert from_env.source == str(tmp_path / "sd")
    monkeypatch.setenv("OCL_BENCH_SD", str(tmp_path))  # not a diffusers folder
    with pytest.raises(DataError, match=r"\$OCL_BENCH_SD=.* is not a diffusers"):
        LatentDiffusionDecoder(LatentDiffusionParams(), dims)


def test_vae_latent_cache_serves_the_second_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCL_BENCH_CACHE", str(tmp_path / "cache"))
    dec = _decoder(cache_latents=True)
    calls: list[int] = []
    real_encode = dec.vae.encode

    def counting(x: torch.Tensor):  # noqa: ANN202
        calls.append(x.shape[0])
        return real_encode(x)

    monkeypatch.setattr(dec.vae, "encode", counting)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = dec.latent_moments(images)
    again = dec.latent_moments(images[[2, 0]])
    assert calls == [3]
    torch.testing.assert_close(again, first[[2, 0]])
    uncached = _decoder(cache_latents=False)
    torch.testing.assert_close(uncached.latent_moments(images), first)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    slots, feats, batch = _inputs()
    grads = []
    for ckpt in (False, True):
        dec = _decoder(train_unet=True, gradient_checkpointing=ckpt).train()
        assert dec.unet.is_gradient_checkpointing == ckpt
        torch.manual_seed(7)
        out = dec(slots, feats, batch)
        (out.prediction - out.target).pow(2).mean().backward()
        grads.append(dec.slot_proj[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_cartesian_position_code_is_the_cell_centres_in_official_order() -> None:
    sa = SlotAttention(
        SlotAttentionParams(position="cartesian", slot_dim=8, mlp_hidden=8),
        Dims(image_size=(32, 32), token_dim=6),
    )
    code = sa.cartesian_code((2, 4), torch.device("cpu"))
    assert code.shape == (8, 4)
    # raster order: token 1 is row 0, column 1; channels (row, col, 1-row, 1-col)
    torch.testing.assert_close(code[1], torch.tensor([0.25, 0.375, 0.75, 0.625]))
    torch.testing.assert_close(code[7], torch.tensor([0.75, 0.875, 0.25, 0.125]))


def test_tiny_stablelsd_row_of_glass_table_4_measures_fid_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCL_BENCH_CACHE", str(tmp_path / "cache"))  # the preset caches latents
    torch.manual_seed(0)  # a random Inception: the real architecture, a measured number
    inception = fidlib.save_torchscript(fidlib.InceptionV3Graph(), tmp_path / fidlib.INCEPTION_FILE)
    tiny = [
        "dataset.name=shapes",
        "dataset.image_size=32",
        "dataset.train_size=4",
        "dataset.val_size=4",
        "encoder.random_init=true",
        "encoder.embed_dim=32",
        "encoder.depth=1",
        "encoder.num_heads=2",
        "encoder.image_size=56",
        "grouping.slot_dim=16",
        "grouping.mlp_hidden=16",
        "decoder.tiny=true",
        "decoder.image_size=0",
        "train.steps=2",
        "train.batch_size=2",
        "train.precision=fp32",
        "train.device=cpu",
        "train.threads=1",
        "eval.num_images=4",
        "eval.batch_size=4",
        "eval.figure_images=1",
        "tasks.object_discovery.mask_size=0",
        "tasks.conditional_generation.steps=2",
        f"tasks.conditional_generation.inception_path={inception}",
        f"tasks.conditional_generation.fid_resolution={fidlib.MIN_RESOLUTION}",
        f"tasks.conditional_generation.fid_cache={tmp_path / 'fidcache'}",
        "tasks.conditional_generation.fid=required",
        # GLASS's rows: data generated by tiny SD stand-ins from class names (no BLIP-2 here)
        "dataset.tiny=true",
        "dataset.steps=2",
        "dataset.captions=class_names",
    ]
    db = tmp_path / "r.sqlite"
    argv = ["grid", "glass-table-4", *tiny, "--db", str(db), "--runs", str(tmp_path / "runs")]
    assert main([*argv, "-q"]) == 0
    assert main(["leaderboard", "glass-table-4", *tiny, "--db", str(db), "--format", "json"]) == 0
    board = json.loads(capsys.readouterr().out)
    row = next(r for r in board["rows"] if r["label"] == "StableLSD")
    for key in ("fid_voc", "fid_coco"):
        assert row["measured"][key] is not None and row["measured"][key] > 0
    protocol = row["protocol"]["fid_coco"]
    assert protocol["steps"] == 2 and protocol["guidance_scale"] == 1.3  # the row's CFG
    assert protocol["solver"] == "DPMSolverMultistepScheduler"
    assert protocol["generated_resolution"] == [32, 32] and protocol["images"] == 4
    assert protocol["null_condition"] == "learned"
    assert list((tmp_path / "cache").glob("*/*.safetensors"))  # VAE posteriors were cached
    for label in ("GLASS† (ours)", "GLASS (ours)"):
        glass = next(r for r in board["rows"] if r["label"] == label)
        assert glass["measured"]["fid_coco"] > 0 and glass["measured"]["fid_voc"] > 0
    (cell,) = [
        c
        for c in ResultStore(db).cells()
        if c.status == "complete" and (c.label or "").startswith("StableLSD")
    ]
    assert cell.record("conditional_generation", "psnr", None)["protocol"]["steps"] == 2


def _save_tiny_clip(root: Path) -> None:
    """A 6-token CLIP tokenizer and a 1-layer random CLIP text encoder (width 32)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (root / "vocab").mkdir(parents=True)
    (root / "vocab" / "vocab.json").write_text(json.dumps(vocab))
    (root / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(root / "vocab" / "vocab.json"), str(root / "vocab" / "merges.txt")
    )
    tokenizer.save_pretrained(root / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=6,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(6)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")


def test_null_condition_is_the_pipelines_empty_caption_when_a_text_encoder_exists(
    no_stable_diffusion: Path, tmp_path: Path
) -> None:
    """LSD's implicit unconditional branch: diffusers' StableDiffusionPipeline encodes ""
    padded to the K prompt tokens; the decoder's explicit null condition is that tensor."""
    pytest.importorskip("transformers")
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    root = tmp_path / "sd"
    unet, vae = _save_sd_folder(root)
    _save_tiny_clip(root)
    dims = Dims(image_size=(32, 32), slot_dim=DS, num_slots=K)
    dec = LatentDiffusionDecoder(LatentDiffusionParams(pretrained=str(root)), dims)
    assert dec.null_kind == "empty_caption" and dec.null_embedding.shape == (K, 32)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        unet=unet,
        scheduler=dec.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    slots = torch.randn(1, K, 32)
    _, negative = pipe.encode_prompt(None, "cpu", 1, True, prompt_embeds=slots)
    torch.testing.assert_close(dec.null_embedding, negative[0])
    # not a parameter: nothing to train, nothing stored in checkpoints
    assert "null_embedding" not in dict(dec.named_parameters())
    assert "null_embedding" not in dec.state_dict()
    learned = LatentDiffusionDecoder(
        LatentDiffusionParams(pretrained=str(root), null_condition="learned"), dims
    )
    assert learned.null_kind == "learned" and isinstance(learned.null_embedding, torch.nn.Parameter)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_generate_equals_diffusers_stable_diffusion_pipeline(scale: float) -> None:
    """LSD samples with StableDiffusionPipeline(text_encoder=None, prompt_embeds=slots) and
    DPM-Solver multistep (train_lsd.py validation); generate() gives the same images for the
    same generator, with the explicit null condition as negative_prompt_embeds."""
    from diffusers import StableDiffusionPipeline

    dec = _decoder().eval()
    with torch.no_grad():
        dec.null_embedding.normal_()
    slots, _, _ = _inputs()
    ours = dec.generate(
        slots, steps=3, guidance_scale=scale, generator=torch.Generator().manual_seed(4)
    )
    pipe = StableDiffusionPipeline(
        vae=dec.vae,
        text_encoder=None,
        tokenizer=None,
        unet=dec.unet,
        scheduler=diffusion.make_solver(dec.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = dec.condition(slots.slots)
        theirs = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=dec.null_embedding.expand_as(cond),
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=scale,
            generator=torch.Generator().manual_seed(4),
            output_type="pt",
        ).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_given_latents_noise_and_timesteps_replace_the_draws_in_the_documented_order() -> None:
    dec = _decoder()
    slots, feats, batch = _inputs()
    torch.manual_seed(5)
    drawn = dec(slots, feats, batch)
    # forward's documented order: VAE posterior sample, randn_like(latents), randint(0, T)
    torch.manual_seed(5)
    latents = dec.encode_latents(batch.images)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (2,))
    given = dec(slots, feats, batch, latents=latents, noise=noise, timesteps=t)
    assert torch.equal(drawn.timesteps, t) and torch.equal(given.timesteps, t)
    assert torch.equal(drawn.extras["latents"], latents)
    assert torch.equal(drawn.prediction, given.prediction)
    assert torch.equal(drawn.target, given.target)


def test_given_noise_and_timesteps_give_train_lsd_loss() -> None:
    """train_lsd.py: noisy = add_noise(z, eps, t); v = alpha_t eps - sigma_t z;
    loss = mse(unet(noisy, t, slots).float(), v.float()), with alpha_t^2 = alpha_bar_t."""
    dec = _decoder()
    slots, feats, batch = _inputs()
    g = torch.Generator().manual_seed(9)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 871])
    out = dec(slots, feats, batch, latents=latents, noise=noise, timesteps=t)
    loss = DenoisingLoss(DenoisingParams())(SimpleNamespace(decoding=out), None)["denoising"]
    ab = _alpha_bar(t)[:, None, None, None]
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    with torch.no_grad():
        pred = dec.unet(noisy, t, encoder_hidden_states=dec.condition(slots.slots)).sample
    expected = F.mse_loss(pred.float(), v.float())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="noise has shape"):
        dec(slots, feats, batch, latents=latents, noise=noise[:, :3])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        dec(slots, feats, batch, latents=latents, timesteps=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="must be integers"):
        dec(slots, feats, batch, latents=latents, timesteps=torch.tensor([0.5, 1.0]))
