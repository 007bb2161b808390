"""Pretrained ViT encoders (encoders/vit.py) and the feature cache, on tiny random ViTs.

Every model here is a timm ViT with embed_dim 32, depth 2, 2 heads on 32x32 images (patch
16, 14 or 8 from the architecture). Checkpoints are written by the tests themselves, in
timm's layout (which the official DINO hub files share) and in the DINOv2 release layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ocl_bench.api.contracts import Batch, Dims
from ocl_bench.api.errors import DataError, IncompatiblePluginsError
from ocl_bench.encoders.vit import ENCODERS, PRETRAINED, ViTParams
from ocl_bench.run.compose import check_compatible
from ocl_bench.run.config import load_config
from ocl_bench.run.feature_cache import FeatureCache, sample_id

ARCH = {"embed_dim": 32, "depth": 2, "num_heads": 2}
SIZE = 32
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No weights from the user's caches or env, and a private feature cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("OCL_BENCH_CACHE", str(tmp_path / "features"))
    for name in ENCODERS:
        monkeypatch.delenv(f"OCL_BENCH_WEIGHTS_{name.upper()}", raising=False)


def images(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encoder(name: str = "dino_vits16", seed: int = 0, **kw):
    values = {"random_init": "weights" not in kw, "image_size": SIZE, **ARCH, **kw}
    torch.manual_seed(seed)
    return ENCODERS[name](ViTParams(**values), Dims(image_size=(SIZE, SIZE)))


def reference(name: str = "dino_vits16", seed: int = 0, img_size: int = SIZE):
    """A complete tiny timm model of this family, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(
        PRETRAINED[name].timm_name, pretrained=False, num_classes=0, img_size=img_size, **ARCH
    )
    return model.eval()


def write(model: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def timm_tokens(model, x: torch.Tensor, block: int, norm: bool = False) -> torch.Tensor:
    """timm's own intermediate patch tokens of `block` (1-based) on normalised input."""
    with torch.no_grad():
        return model.forward_intermediates(
            (x - MEAN) / STD,
            indices=[block - 1],
            norm=norm,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]


# --- tokens, blocks, norm, preprocessing -------------------------------------------------


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_token_count_is_the_grid_with_cls_and_registers_removed(name: str) -> None:
    enc = encoder(name)
    patch = enc.vit.patch_embed.patch_size[0]
    h, w = enc.grid
    assert (h, w) == (SIZE // patch, SIZE // patch)
    feats = enc(Batch(images=images()))
    assert feats.tokens.shape == (2, h * w, 32)
    assert feats.grid == (h, w)
    prefix = 5 if name.endswith("_reg") else 1  # CLS (+ 4 registers)
    assert enc.vit.num_prefix_tokens == prefix
    dims = enc.output_dims(Dims(image_size=(SIZE, SIZE)))
    assert (dims.grid, dims.token_dim, dims.target_dim) == ((h, w), 32, 32)


def test_register_variant_drops_exactly_the_prefix_tokens(tmp_path: Path) -> None:
    ref = reference("dinov2_vitb14_reg")
    path = str(write(ref, tmp_path / "w.pth"))
    enc = encoder("dinov2_vitb14_reg", block=2, final_norm=True, weights=path)
    x = images()
    with torch.no_grad():
        full = ref.forward_features((x - MEAN) / STD)  # [B, CLS + 4 registers + 4 patches, D]
    tokens = enc(Batch(images=x)).tokens
    assert full.shape[1] == 5 + 4 and tokens.shape[1] == 4
    torch.testing.assert_close(tokens, full[:, 5:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vits14", "dinov2_vitb14_reg"])
def test_block_selection_equals_timm_blocks_up_to_that_block(name: str, tmp_path: Path) -> None:
    ref = reference(name)
    path = str(write(ref, tmp_path / "w.safetensors"))
    x = images()
    outs = {}
    for block in (1, 2):
        enc = encoder(name, block=block, weights=path)
        assert len(enc.vit.blocks) == block  # later blocks are dropped
        outs[block] = enc(Batch(images=x)).tokens
        torch.testing.assert_close(outs[block], timm_tokens(ref, x, block), rtol=0, atol=1e-6)
        # and by hand: patch embed, prefix + position, the first `block` blocks
        with torch.no_grad():
            h = ref._pos_embed(ref.patch_embed((x - MEAN) / STD))
            for blk in ref.blocks[:block]:
                h = blk(h)
        torch.testing.assert_close(outs[block], h[:, ref.num_prefix_tokens :], rtol=0, atol=1e-6)
    assert not torch.allclose(outs[1], outs[2])


def test_final_norm_on_and_off(tmp_path: Path) -> None:
    ref = reference()
    path = str(write(ref, tmp_path / "w.pth"))
    x = images()
    off = encoder(block=2, weights=path)(Batch(images=x)).tokens
    on = encoder(block=2, weights=path, final_norm=True)(Batch(images=x)).tokens
    assert not torch.allclose(on, off, atol=1e-3)
    torch.testing.assert_close(on, timm_tokens(ref, x, 2, norm=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(off, timm_tokens(ref, x, 2, norm=False), rtol=0, atol=1e-6)
    # the pre-norm variant does not even keep the norm's weights (truncated like OCLF)
    assert "vit.norm.weight" not in encoder(weights=path).state_dict()


def test_imagenet_normalisation_and_resize_are_applied(tmp_path: Path) -> None:
    ref = reference()
    path = str(write(ref, tmp_path / "w.pth"))
    enc = encoder(block=2, weights=path)
    x = images()
    ours = enc(Batch(images=x)).tokens
    with torch.no_grad():
        manual = ref.forward_intermediates(
            (x - MEAN) / STD, indices=[1], output_fmt="NLC", intermediates_only=True
        )[0]
        raw = ref.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, raw[0], atol=1e-3)
    # a 48x48 dataset image is resized (bicubic, antialiased) to the encoder's 32x32
    big = images(size=48)
    small = F.interpolate(big, size=(SIZE, SIZE), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(
        enc(Batch(images=big)).tokens, timm_tokens(ref, small, 2), rtol=0, atol=1e-6
    )


def _vit_input(enc, x: torch.Tensor) -> torch.Tensor:
    """What reaches the ViT's patch embedding when `enc` encodes `x`."""
    seen = []
    hook = enc.vit.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        enc(Batch(images=x))
    finally:
        hook.remove()
    return seen[0]


def test_half_normalisation_feeds_the_vit_x_minus_half_over_half(tmp_path: Path) -> None:
    """SlotDiffusion's loaders give DINO (x - 0.5) / 0.5 (Normalize(0.5, 0.5)); the default
    stays ImageNet's mean/std."""
    ref = reference()
    path = str(write(ref, tmp_path / "w.pth"))
    x = images()
    half = encoder(block=2, weights=path, normalize="half")
    torch.testing.assert_close(_vit_input(half, x), (x - 0.5) / 0.5, rtol=0, atol=0)
    default = encoder(block=2, weights=path)
    assert default.params.normalize == "imagenet"
    torch.testing.assert_close(_vit_input(default, x), (x - MEAN) / STD, rtol=0, atol=0)
    with torch.no_grad():
        expected = ref.forward_intermediates(
            (x - 0.5) / 0.5, indices=[1], output_fmt="NLC", intermediates_only=True
        )[0]
    tokens = half(Batch(images=x)).tokens
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(tokens, default(Batch(images=x)).tokens, atol=1e-3)
    # the SlotDiffusion presets set it; the other DINO presets keep ImageNet's
    assert load_config("slotdiffusion-coco").encoder.params.normalize == "half"
    assert load_config("slotdiffusion-voc").encoder.params.normalize == "half"
    assert load_config("spot-coco").encoder.params.normalize == "imagenet"


# --- frozen and fine-tuned --------------------------------------------------------------


def test_frozen_encoder_has_no_grads_and_stays_in_eval() -> None:
    enc = encoder()
    enc.train()  # what the training loop does to the whole model
    assert enc.training and not enc.vit.training
    assert all(not m.training for m in enc.vit.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    x = images().requires_grad_(True)
    feats = enc(Batch(images=x))
    assert feats.tokens.grad_fn is None and not feats.tokens.requires_grad
    assert feats.targets is not None and torch.equal(feats.targets, feats.tokens)


def test_finetune_from_trains_later_blocks_and_targets_come_from_frozen_copy() -> None:
    enc = encoder(finetune_from=1)
    frozen = encoder()  # same seed: the original weights
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vit.blocks.1.") for n in trainable)
    assert not any(p.requires_grad for p in enc.target_vit.parameters())
    enc.train()
    assert not enc.vit.training and not enc.target_vit.training
    x = images(4)
    before = enc(Batch(images=x))
    torch.testing.assert_close(before.targets, frozen(Batch(images=x)).tokens, rtol=0, atol=0)
    torch.testing.assert_close(before.tokens, before.targets, rtol=0, atol=0)  # not trained yet
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=1.0)
    before.tokens.pow(2).sum().backward()
    assert enc.vit.blocks[0].attn.qkv.weight.grad is None
    assert enc.vit.blocks[1].attn.qkv.weight.grad is not None
    opt.step()
    after = enc(Batch(images=x))
    assert not torch.allclose(after.tokens, before.tokens)
    torch.testing.assert_close(after.targets, before.targets, rtol=0, atol=0)
    assert after.targets.grad_fn is None


def test_finetune_from_must_leave_a_trainable_block() -> None:
    with pytest.raises(ValueError, match="finetune_from"):
        encoder(finetune_from=2)
    with pytest.raises(ValueError, match="block"):
        encoder("dino_vits16", random_init=True, block=13, embed_dim=0, depth=0, num_heads=0)


# --- loading weights --------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename,prefix",
    [("dino.pth", ""), ("dino_teacher.pth", "teacher."), ("dino.safetensors", "module.")],
)
def test_official_dino_layout_reproduces_the_model(tmp_path: Path, filename, prefix) -> None:
    ref = reference("dino_vitb16", seed=3)
    path = write(ref, tmp_path / filename, prefix)
    keys = list(torch.load(path) if path.suffix == ".pth" else load_file(str(path)))
    assert f"{prefix}blocks.0.attn.qkv.weight" in keys and f"{prefix}norm.weight" in keys
    enc = encoder("dino_vitb16", block=2, final_norm=True, weights=str(path))
    x = images()
    torch.testing.assert_close(
        enc(Batch(images=x)).tokens, timm_tokens(ref, x, 2, norm=True), rtol=0, atol=1e-6
    )
    assert not torch.allclose(
        enc(Batch(images=x)).tokens, encoder("dino_vitb16")(Batch(images=x)).tokens
    )


def test_full_dino_checkpoint_takes_the_teacher_backbone(tmp_path: Path) -> None:
    ref = reference("dino_vits16", seed=4)
    teacher = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 32)  # DINO's projection head: not ours
    student = {f"module.{k}": v + 1 for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 100}, tmp_path / "full.pth")
    enc = encoder("dino_vits16", block=2, weights=str(tmp_path / "full.pth"))
    x = images()
    torch.testing.assert_close(
        enc(Batch(images=x)).tokens, timm_tokens(ref, x, 2), rtol=0, atol=1e-6
    )


def test_dinov2_release_layout_with_registers_is_converted(tmp_path: Path) -> None:
    """The DINOv2 hub layout: register_tokens, mask_token, a CLS slot in pos_embed."""
    ref = reference("dinov2_vitb14_reg", seed=5)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    cls_pos = torch.randn(1, 32)
    official = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = state["reg_token"]
    official["mask_token"] = torch.zeros(1, 32)
    official["cls_token"] = state["cls_token"] - cls_pos
    official["pos_embed"] = torch.cat([cls_pos[:, None], state["pos_embed"]], dim=1)
    torch.save(official, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    enc = encoder(
        "dinov2_vitb14_reg", block=2, weights=str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    )
    x = images()
    torch.testing.assert_close(
        enc(Batch(images=x)).tokens, timm_tokens(ref, x, 2), rtol=0, atol=1e-5
    )


def test_position_embedding_is_resampled_to_image_size(tmp_path: Path) -> None:
    ref = reference("dino_vits16", img_size=64)  # a 4x4 grid checkpoint, like 224 vs 518
    enc = encoder("dino_vits16", weights=str(write(ref, tmp_path / "w.pth")))
    assert enc.grid == (2, 2) and enc.vit.pos_embed.shape == (1, 1 + 4, 32)
    assert enc(Batch(images=images())).tokens.shape == (2, 4, 32)


def test_wrong_key_lists_missing_and_unexpected(tmp_path: Path) -> None:
    state = dict(reference().state_dict())
    state["blocks.0.attn.qkv_typo.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DataError) as err:
        encoder(weights=str(tmp_path / "bad.pth"))
    text = str(err.value)
    assert "missing keys (1): [blocks.0.attn.qkv.weight]" in text
    assert "unexpected keys (1): [blocks.0.attn.qkv_typo.weight]" in text


def test_wrong_architecture_lists_shape_mismatches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wide = timm.create_model(
        "vit_small_patch16_224", num_classes=0, img_size=SIZE, embed_dim=64, depth=2, num_heads=2
    )
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(
        DataError,
        match=r"shape mismatches \(30\): .*qkv.weight: file \(192, 64\) vs model \(96, 32\)",
    ):
        encoder(weights=str(tmp_path / "wide.pth"))


def test_no_weights_names_timm_model_file_and_env_var(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        encoder("dino_vitb16", random_init=False)
    text = str(err.value)
    for needle in (
        "vit_base_patch16_224.dino",
        "OCL_BENCH_WEIGHTS_DINO_VITB16",
        "dino_vitbase16_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "encoder.weights",
    ):
        assert needle in text
    with pytest.raises(DataError, match="file not found"):
        encoder("dino_vitb16", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(DataError, match="weights_only"):
        (tmp_path / "junk.pth").write_bytes(b"not a pickle")
        encoder("dino_vitb16", weights=str(tmp_path / "junk.pth"))


def test_weights_from_env_var_hf_cache_and_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = reference("dino_vitb16", seed=6)
    x = images()
    expected = timm_tokens(ref, x, 2)

    def tokens() -> torch.Tensor:
        return encoder("dino_vitb16", random_init=False, block=2)(Batch(images=x)).tokens

    # the torch.hub cache, under the official file name
    hub = tmp_path / "torch" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth"
    hub.parent.mkdir(parents=True)
    write(ref, hub)
    torch.testing.assert_close(tokens(), expected, rtol=0, atol=1e-6)
    hub.unlink()
    # the Hugging Face cache, where timm puts its weights (repo timm/<model name>)
    snap = tmp_path / "hf" / "models--timm--vit_base_patch16_224.dino"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    write(ref, snap / "snapshots" / "abc123" / "model.safetensors")
    torch.testing.assert_close(tokens(), expected, rtol=0, atol=1e-6)
    # the env var wins over the caches
    other = reference("dino_vitb16", seed=7)
    monkeypatch.setenv("OCL_BENCH_WEIGHTS_DINO_VITB16", str(write(other, tmp_path / "o.pth")))
    torch.testing.assert_close(tokens(), timm_tokens(other, x, 2), rtol=0, atol=1e-6)


# --- composition and training -----------------------------------------------------------

VIT_RUN = [
    "encoder.name=dino_vits16",
    "encoder.random_init=true",
    "encoder.embed_dim=32",
    "encoder.depth=2",
    "encoder.num_heads=2",
    "encoder.image_size=32",
    "dataset.image_size=32",
    "decoder.target=features",
    "train.steps=2",
    "train.batch_size=4",
    "tasks={}",
    "grouping.slot_dim=32",
]


def test_composer_accepts_feature_targets_from_a_vit() -> None:
    check_compatible(load_config(None, VIT_RUN))
    with pytest.raises(IncompatiblePluginsError, match="features.targets"):
        check_compatible(load_config(None, [*VIT_RUN, "encoder.name=cnn"]))


def test_tiny_training_run_with_a_frozen_vit(tmp_path: Path) -> None:
    from ocl_bench.run.compose import build_model
    from ocl_bench.run.train import train

    cfg = load_config(None, [*VIT_RUN, "train.threads=1", "train.warmup_steps=1"])
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg, (SIZE, SIZE)).state_dict()
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    # frozen: stored as a hash, not a copy; the run loads back with the same encoder
    assert not any(k.startswith("encoder.") for k in weights)
    from ocl_bench.run.evaluate import load_run

    _, loaded, _ = load_run(tmp_path / "run")
    vit_keys = [k for k in initial if k.startswith("encoder.vit.")]
    assert vit_keys
    for k in vit_keys:
        assert torch.equal(loaded.state_dict()[k], initial[k]), k
    assert any(
        not torch.equal(weights[k], initial[k]) for k in weights if k.startswith("grouping.")
    )
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=True)
    optimised = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    model = build_model(cfg, (SIZE, SIZE))
    expected = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    assert optimised == expected
    assert not any(p.requires_grad for p in model.encoder.parameters())
    log = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == [1, 2]


# --- feature cache ----------------------------------------------------------------------


def test_feature_cache_round_trip_partial_hits_and_keys(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "c")
    key = cache.key(encoder="x", block=12)
    assert key != cache.key(encoder="x", block=11)
    assert key == FeatureCache(tmp_path / "other").key(block=12, encoder="x")
    data = torch.randn(3, 4, 5)
    assert cache.get(key, ["a", "b", "c"]) is None
    shard = cache.put(key, ["a", "b", "c"], data)
    assert shard is not None and shard.parent.name == key
    assert json.loads((shard.parent / "key.json").read_text()) == {"encoder": "x", "block": 12}
    assert not [p for p in shard.parent.iterdir() if p.name.endswith(".tmp")]
    fresh = FeatureCache(tmp_path / "c")  # another process: finds the shards on disk
    assert torch.equal(fresh.get(key, ["c", "a"]), data[[2, 0]])
    assert fresh.get(key, ["a", "zzz"]) is None
    assert set(fresh.lookup(key, ["a", "zzz"])) == {"a"}
    assert fresh.put(key, ["a", "b"], data[:2]) is None  # nothing new
    fresh.put(key, ["b", "d"], torch.zeros(2, 4, 5))  # b already stored: d only
    assert torch.equal(FeatureCache(tmp_path / "c").get(key, ["b", "d"])[0], data[1])
    assert FeatureCache(tmp_path / "c").get(cache.key(encoder="x", block=11), ["a"]) is None


def test_feature_cache_treats_a_corrupt_shard_as_a_miss(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    key = cache.key(k=1)
    shard = cache.put(key, ["a"], torch.ones(1, 2))
    shard.write_bytes(shard.read_bytes()[:20])
    assert FeatureCache(tmp_path).get(key, ["a"]) is None


def counting(enc) -> list[int]:
    """Batch sizes of every ViT run of `enc` (frozen copy included)."""
    calls: list[int] = []
    for vit in {id(enc.vit): enc.vit, id(enc.frozen_vit): enc.frozen_vit}.values():
        vit.patch_embed.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_cached_tokens_equal_uncached_and_second_pass_skips_the_vit(tmp_path: Path) -> None:
    x = images(4)
    plain = encoder()(Batch(images=x)).tokens
    enc = encoder(cache=True)
    calls = counting(enc)
    first = enc(Batch(images=x))
    assert calls == [4]
    assert torch.equal(first.tokens, plain) and torch.equal(first.targets, plain)
    again = encoder(cache=True)  # a new run: a new encoder, the same cache on disk
    calls = counting(again)
    second = again(Batch(images=x))
    assert calls == [] and torch.equal(second.tokens, plain)
    assert second.tokens.dtype == plain.dtype and not second.tokens.requires_grad
    # a batch with two cached and two new images runs the ViT on the two new ones only
    mixed = torch.cat([x[:2], images(2, seed=1)])
    out = again(Batch(images=mixed)).tokens
    assert calls == [2]
    assert torch.equal(out[:2], plain[:2])
    torch.testing.assert_close(
        out[2:], encoder()(Batch(images=mixed)).tokens[2:], rtol=0, atol=1e-6
    )
    assert sample_id(x[0]) != sample_id(x[0].flip(-1))


def test_changing_block_or_weights_invalidates_the_cache(tmp_path: Path) -> None:
    x = images(2)
    base = encoder(cache=True)(Batch(images=x)).tokens
    weights = str(write(reference(seed=2), tmp_path / "w.pth"))
    for change in (
        {"block": 1},
        {"seed": 1},  # other random weights
        {"final_norm": True},
        {"weights": weights},
        {"image_size": 48},
        {"normalize": "half"},
    ):
        changed = encoder(cache=True, **change)
        calls = counting(changed)
        tokens = changed(Batch(images=x)).tokens
        assert calls == [2], change  # a miss: the ViT ran
        assert tokens.shape != base.shape or not torch.allclose(tokens, base), change
        assert torch.equal(tokens, encoder(**change)(Batch(images=x)).tokens), change
        again = encoder(cache=True, **change)  # and now that setting hits too
        calls = counting(again)
        assert torch.equal(again(Batch(images=x)).tokens, tokens) and calls == [], change
    same = encoder(cache=True)
    calls = counting(same)
    assert torch.equal(same(Batch(images=x)).tokens, base) and calls == []


def test_finetuned_encoder_caches_only_the_frozen_targets() -> None:
    x = images(2)
    encoder(finetune_from=1, cache=True)(Batch(images=x))
    enc = encoder(finetune_from=1, cache=True)
    trained = counting_one(enc.vit)
    frozen = counting_one(enc.target_vit)
    feats = enc(Batch(images=x))
    assert trained == [2] and frozen == []
    assert feats.tokens.requires_grad and not feats.targets.requires_grad
    torch.testing.assert_close(feats.targets, encoder()(Batch(images=x)).tokens, rtol=0, atol=0)


def counting_one(vit) -> list[int]:
    calls: list[int] = []
    vit.patch_embed.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_training_with_the_cache_gives_the_same_weights(tmp_path: Path) -> None:
    from ocl_bench.run.train import train

    base = [*VIT_RUN, "train.threads=1", "train.warmup_steps=1"]
    train(load_config(None, base), tmp_path / "plain", progress=False)
    for run in ("fill", "hit"):  # the first run fills the cache, the second reads it
        train(load_config(None, [*base, "encoder.cache=true"]), tmp_path / run, progress=False)
    shards = list((tmp_path / "features").glob("*/*.safetensors"))
    assert len(shards) == 2  # one per step of the first run; the second run added none
    plain = load_file(str(tmp_path / "plain" / "checkpoint" / "model.safetensors"))
    for run in ("fill", "hit"):
        cached = load_file(str(tmp_path / run / "checkpoint" / "model.safetensors"))
        assert cached.keys() == plain.keys()
        assert all(torch.equal(cached[k], plain[k]) for k in plain), run
