"""MAGE encoder, decoder, MaskGIT generation and `ocl-bench import mage`, at tiny sizes.

Checkpoints are written by the tests in the official key layout
(../shared/reference/spot-and-mage.md section j), built from the key list, not from our
modules, so a renamed module fails here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ocl_bench.api.contracts import Batch, Progress, TokenState
from ocl_bench.api.errors import ConfigError, DataError, IncompatiblePluginsError
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import load_raw, resolve

TOKENIZER = [
    "encoder.tokenizer.ch=8",
    "encoder.tokenizer.ch_mult=[1,2]",
    "encoder.tokenizer.n_embed=32",
    "encoder.tokenizer.embed_dim=8",
    "encoder.tokenizer.norm_groups=4",
]
TINY_MAGE = [
    "dataset.image_size=32",
    "encoder.name=mage_vitb16",
    "encoder.image_size=32",  # the tiny tokenizer halves the side: a 16x16 grid, 256 ids
    "encoder.embed_dim=32",
    "encoder.depth=2",
    "encoder.num_heads=2",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=16",
    "decoder.name=mage",
    "decoder.depth=2",
    "decoder.num_heads=2",
]
RANDOM = ["encoder.random_init=true", *TOKENIZER]
OFFICIAL_UNUSED = {
    "cls_token",
    "pos_embed",
    "mask_token",
    "decoder_pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "decoder_pred.weight",
    "decoder_pred.bias",
}


def make_model(*extra: str, masking: str = "mage", seed: int = 0):
    torch.manual_seed(seed)
    raw = load_raw(None, [*TINY_MAGE, f"encoder.masking={masking}", *extra])
    raw["objectives"] = {"token_cross_entropy": {"label_smoothing": 0.1}}
    cfg = resolve(raw)
    return build_model(cfg, (32, 32)), cfg


def official_shapes(
    dim: int, depth: int, dec_dim: int, dec_depth: int, tokens: int, codebook: int
) -> dict[str, tuple[int, ...]]:
    """The MAGE model's own keys and shapes (models_mage.py), without vqgan.*."""
    vocab = codebook + 1001
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens + 1, dim),
        "mask_token": (1, 1, dec_dim),
        "decoder_pos_embed": (1, tokens + 1, dec_dim),
        "decoder_pos_embed_learned": (1, tokens + 1, dec_dim),
        "token_emb.position_ids": (1, tokens + 1),
        "token_emb.word_embeddings.weight": (vocab, dim),
        "token_emb.position_embeddings.weight": (tokens + 1, dim),
        "token_emb.LayerNorm.weight": (dim,),
        "token_emb.LayerNorm.bias": (dim,),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "decoder_embed.weight": (dec_dim, dim),
        "decoder_embed.bias": (dec_dim,),
        "decoder_norm.weight": (dec_dim,),
        "decoder_norm.bias": (dec_dim,),
        "decoder_pred.weight": (768, dec_dim),
        "decoder_pred.bias": (768,),
        "mlm_layer.bias": (1, 1, vocab),
        "mlm_layer.fc.weight": (dim, dec_dim),
        "mlm_layer.fc.bias": (dim,),
        "mlm_layer.ln.weight": (dim,),
        "mlm_layer.ln.bias": (dim,),
    }
    for prefix, d, n in (("blocks", dim, depth), ("decoder_blocks", dec_dim, dec_depth)):
        for i in range(n):
            b = f"{prefix}.{i}."
            for norm in ("norm1", "norm2"):
                shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (d,)
            shapes[b + "attn.qkv.weight"], shapes[b + "attn.qkv.bias"] = (3 * d, d), (3 * d,)
            shapes[b + "attn.proj.weight"], shapes[b + "attn.proj.bias"] = (d, d), (d,)
            shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (4 * d, d), (4 * d,)
            shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (d, 4 * d), (d,)
    return shapes


def tiny_vqgan_state(codebook: int = 32) -> dict[str, torch.Tensor]:
    from ocl_bench.run.registry import build_tokenizer

    torch.manual_seed(1)
    values = {"random_init": True, "ch": 8, "ch_mult": [1, 2], "n_embed": codebook}
    tok = build_tokenizer("vqgan", {**values, "embed_dim": 8, "norm_groups": 4}, "t")
    return {f"vqgan.{k}": v.clone() for k, v in tok.state_dict().items()}


def write_official(path: Path, codebook: int = 32, vqgan_codebook: int = 32) -> dict:
    """A tiny MAGE checkpoint {'model': ..., 'epoch': ...} in the official key layout."""
    g = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes(32, 2, 32, 2, 256, codebook).items():
        if key == "token_emb.position_ids":
            state[key] = torch.arange(257).unsqueeze(0)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    state.update(tiny_vqgan_state(vqgan_codebook))
    torch.save({"model": state, "epoch": 1599}, path)
    return state


# ---------------------------------------------------------------- layout and loading


def test_vit_b_modules_have_the_official_keys_and_shapes() -> None:
    from ocl_bench.api.params import build_params
    from ocl_bench.decoders.mage import MageDecoder
    from ocl_bench.encoders.mage import MageEncoder

    official = official_shapes(768, 12, 768, 8, 256, 1024)
    assert len(official) == 265  # the reference's count of MAGE keys (433 - 168 vqgan.*)
    with torch.device("meta"):
        params = build_params(MageEncoder.Params, {"random_init": True}, "encoder")
        enc = MageEncoder(params)
        dims = enc.output_dims(__import__("ocl_bench.api.contracts").contracts.Dims((256, 256)))
        dims.slot_dim = 256
        dec = MageDecoder(build_params(MageDecoder.Params, {}, "decoder"), dims)
    ours = {
        k: tuple(v.shape) for k, v in enc.state_dict().items() if not k.startswith("tokenizer.")
    }
    ours |= {
        k: tuple(v.shape) for k, v in dec.state_dict().items() if not k.startswith("slot_proj.")
    }
    expected = {k: v for k, v in official.items() if k not in OFFICIAL_UNUSED}
    assert ours == expected
    assert enc.vocab.fake_class_id == 1100 and enc.vocab.mask_id == 2024


def test_official_checkpoint_loads_strictly_into_encoder_and_decoder(tmp_path: Path) -> None:
    path = tmp_path / "mage-tiny.pth"
    state = write_official(path)
    model, _ = make_model(
        f"encoder.checkpoint={path}",
        "decoder.pretrained=true",
        f"decoder.checkpoint={path}",
        *TOKENIZER,
    )
    enc_state, dec_state = model.encoder.state_dict(), model.decoder.state_dict()
    for key in ("token_emb.word_embeddings.weight", "blocks.1.attn.qkv.weight", "norm.bias"):
        assert torch.equal(enc_state[key], state[key])
    assert torch.equal(
        enc_state["tokenizer.quantize.embedding.weight"], state["vqgan.quantize.embedding.weight"]
    )
    for key in ("decoder_pos_embed_learned", "decoder_blocks.1.mlp.fc2.weight", "mlm_layer.bias"):
        assert torch.equal(dec_state[key], state[key])
    assert model.encoder.weights_source == str(path)


def test_import_mage_writes_a_run_with_the_files_weights(tmp_path: Path) -> None:
    from ocl_bench.run.importing import import_checkpoint

    path = tmp_path / "mage-tiny.pth"
    state = write_official(path)
    out = tmp_path / "run"
    overrides = ["importer.num_heads=2", "encoder.tokenizer.norm_groups=4", "dataset.image_size=32"]
    result = import_checkpoint("mage", path, out, overrides)
    info = json.loads((out / "import.json").read_text())
    ignored = next(n for n in info["notes"] if n.startswith("ignored"))
    assert all(k in ignored for k in OFFICIAL_UNUSED)
    assert any("grouping" in n and "slot_proj" in n for n in info["notes"])
    assert info["layout"]["codebook_size"] == 32 and info["layout"]["num_tokens"] == 256
    model = result.model
    assert torch.equal(model.decoder.mlm_layer.fc.weight, state["mlm_layer.fc.weight"])
    assert torch.equal(
        model.encoder.tokenizer.decoder.conv_out.weight, state["vqgan.decoder.conv_out.weight"]
    )
    assert (out / "checkpoint").exists() and "random_init = true" in (
        out / "config.toml"
    ).read_text()


# ---------------------------------------------------------------- masking


def test_mask_ratio_and_drop_follow_mages_schedule() -> None:
    model, _ = make_model(*RANDOM)
    enc = model.encoder.train()
    torch.manual_seed(3)
    ratios = torch.tensor([enc.sample_ratio() for _ in range(600)])
    assert ratios.min() >= 0.5 and ratios.max() <= 1.0
    assert abs(ratios.mean().item() - 0.694) < 0.02  # the truncated Gaussian's mean
    assert ratios.std().item() > 0.1
    for r in (0.5, 0.61, 1.0):
        state = enc.sample_mask(4, r, torch.device("cpu"))
        hidden = (state != TokenState.VISIBLE).sum(1)
        dropped = (state == TokenState.DROPPED).sum(1)
        assert hidden.tolist() == [math.ceil(256 * r)] * 4
        assert dropped.tolist() == [128] * 4  # ceil(256 * 0.5), always


def test_masked_pass_hides_masked_and_dropped_ids() -> None:
    model, _ = make_model(*RANDOM)
    enc = model.encoder.eval()
    ids = torch.randint(0, 32, (2, 256))
    state = enc.sample_mask(2, 0.7, torch.device("cpu"))
    out, kept = enc.masked_pass(ids, state)
    assert out.shape == (2, 1 + 128, 32)
    assert torch.equal(kept, (state != TokenState.DROPPED).nonzero()[:, 1].view(2, -1))
    for hidden in (TokenState.DROPPED, TokenState.MASKED, TokenState.VISIBLE):
        changed = torch.where(state == hidden, (ids + 1) % 32, ids)
        same = torch.allclose(enc.masked_pass(changed, state)[0], out)
        assert same == (hidden != TokenState.VISIBLE), hidden


def test_features_of_both_branches() -> None:
    model, _ = make_model(*RANDOM)
    model.train()
    out = model(Batch(images=torch.rand(2, 3, 32, 32)))
    f = out.features
    assert f.tokens.shape == (2, 256, 32) and f.grid == (16, 16)
    assert f.masked_tokens.shape == (2, 129, 32)
    assert int((f.token_mask == TokenState.DROPPED).sum()) == 2 * 128
    # the slot branch saw every id: its tokens equal a pass without masking
    assert torch.allclose(f.tokens, model.encoder.encode_ids(f.token_ids)[:, 1:])


def test_given_token_masks_replay_the_draw_and_other_masks_change_the_output() -> None:
    from ocl_bench.encoders.mage import TokenMasks

    # learned slot queries: the slots draw no noise, so the draw's masks are its only
    # randomness and the two paths may be compared exactly
    model, _ = make_model(*RANDOM, "grouping.init=learned_queries")
    model.eval()
    batch = Batch(images=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(5)
    drawn = model(batch)
    state = drawn.features.token_mask
    masks = TokenMasks.from_state(state)
    assert torch.equal(masks.state(), state) and 0 < int(masks.dropped.sum()) < masks.masked.sum()
    torch.manual_seed(6)  # another seed: given masks consume no random numbers
    with model.encoder.use_masks(masks):
        given = model(batch)
    assert model.encoder._given_masks is None  # the block's masks do not outlive it
    assert torch.equal(given.decoding.logits, drawn.decoding.logits)
    assert torch.equal(given.decoding.masks, drawn.decoding.masks)
    assert torch.equal(given.features.token_mask, state)
    assert torch.equal(given.decoding.predicted, masks.masked)
    features = model.encoder(batch, masks=masks)  # the encoder alone, by keyword
    assert torch.equal(features.masked_tokens, drawn.features.masked_tokens)

    # the official layout (float 0/1) is accepted; one dropped position moved elsewhere
    dropped = masks.dropped.clone()
    visible = (~masks.masked[0]).nonzero()[0, 0]
    gone = masks.dropped[0].nonzero()[0, 0]
    dropped[0, gone], dropped[0, visible] = False, True
    masked = masks.masked.clone()
    masked[0, visible] = True
    masked[0, gone] = False
    other = TokenMasks(masked=masked.float(), dropped=dropped.float())
    with model.encoder.use_masks(other):
        moved = model(batch)
    assert torch.equal(moved.features.token_mask[1], state[1])
    assert not torch.allclose(moved.decoding.logits[0], drawn.decoding.logits[0])
    assert torch.equal(moved.decoding.predicted, masked)


def test_token_masks_are_checked() -> None:
    from ocl_bench.encoders.mage import TokenMasks

    masked = torch.zeros(2, 256, dtype=torch.bool)
    masked[:, :200] = True
    dropped = torch.zeros_like(masked)
    dropped[:, :100] = True
    with pytest.raises(ValueError, match="dropped position must also be masked"):
        TokenMasks(masked=dropped, dropped=masked)
    uneven = dropped.clone()
    uneven[1, 150] = True
    with pytest.raises(ValueError, match="same number of positions, got \\[155, 156\\]"):
        TokenMasks(masked=masked, dropped=uneven)
    model, _ = make_model(*RANDOM)
    batch = Batch(images=torch.rand(3, 3, 32, 32))
    with pytest.raises(ValueError, match="do not fit this batch: 3 images of 256"):
        model.encoder(batch, masks=TokenMasks(masked=masked, dropped=dropped))
    model.encoder.params = dataclasses.replace(model.encoder.params, masking="none")
    three = TokenMasks(masked=masked[:1].expand(3, -1), dropped=dropped[:1].expand(3, -1))
    with pytest.raises(ConfigError, match="given token masks need .*encoder.masking=mage"):
        model.encoder(batch, masks=three)


# ---------------------------------------------------------------- loss and head


def test_loss_is_label_smoothed_ce_over_masked_positions_only() -> None:
    model, cfg = make_model(*RANDOM)
    model.train()
    out = model(Batch(images=torch.rand(2, 3, 32, 32)))
    d = out.decoding
    logits = d.logits.detach().requires_grad_(True)
    d.logits = logits
    objective = cfg.objectives[0].cls(cfg.objectives[0].params)
    loss = objective(out, Batch(images=torch.zeros(1)), Progress(0, 1))["token_cross_entropy"]
    loss.backward()
    visible = out.features.token_mask == TokenState.VISIBLE
    assert torch.equal(d.predicted, ~visible)
    assert logits.grad[visible].abs().max() == 0 and logits.grad[~visible].abs().max() > 0
    # MAGE's LabelSmoothingCrossEntropy: 0.9 * nll + 0.1 * mean(-log p), over masked tokens
    logp = F.log_softmax(logits.detach(), -1)
    nll = -logp.gather(-1, d.target_ids.unsqueeze(-1)).squeeze(-1)
    manual = 0.9 * nll + 0.1 * (-logp.mean(-1))
    assert torch.allclose(loss, manual[~visible].mean(), atol=1e-6)
    assert d.logits.shape[-1] == 32  # codebook columns only


def test_head_is_tied_to_detached_word_embeddings() -> None:
    model, _ = make_model(*RANDOM, "encoder.finetune_from=0")
    model.train()
    words = model.encoder.token_emb.word_embeddings.weight
    words.requires_grad_(True)
    torch.manual_seed(5)
    out = model(Batch(images=torch.rand(2, 3, 32, 32)))
    out.decoding.logits[out.decoding.predicted].logsumexp(-1).sum().backward()
    assert words.grad is None  # the embedding lookup runs frozen, the head uses .detach()
    assert model.decoder.mlm_layer.fc.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # fine-tuned
    model.eval()
    feats = model.encoder(Batch(images=torch.rand(1, 3, 32, 32)))
    masked = feats.token_mask != TokenState.VISIBLE
    before = model.decoder.decode(feats.masked_tokens, feats.kept, masked, None)[0]
    with torch.no_grad():
        words[5] += 1.0
    after = model.decoder.decode(feats.masked_tokens, feats.kept, masked, None)[0]
    assert not torch.allclose(before[..., 5], after[..., 5])  # tied: the column moved
    assert torch.allclose(before[..., 6], after[..., 6])


def test_decoder_masks_are_a_distribution_over_slots() -> None:
    model, _ = make_model(*RANDOM)
    out = model.eval()(Batch(images=torch.rand(2, 3, 32, 32)))
    masks = out.decoding.masks
    assert masks.shape == (2, 256, 3)
    assert torch.allclose(masks.sum(-1), torch.ones(2, 256), atol=1e-5)


def test_finetune_from_trains_late_blocks_and_norm_only() -> None:
    model, _ = make_model(*RANDOM, "encoder.finetune_from=1")
    enc = model.encoder.train()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.")) for n in trainable)
    assert not enc.blocks[0].training and enc.blocks[1].training and not enc.token_emb.training
    assert [len(g["params"]) for g in enc.param_groups()] == [len(trainable)]


# ---------------------------------------------------------------- generation


def test_generation_is_seeded_keeps_known_ids_and_unmasks_everything() -> None:
    model, _ = make_model(*RANDOM)
    model.eval()
    slots = model(Batch(images=torch.rand(2, 3, 32, 32))).slots
    dec = model.decoder
    run = lambda seed: dec.sample_ids(  # noqa: E731
        slots.slots, steps=4, generator=torch.Generator().manual_seed(seed)
    )
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert int((first == dec.vocab.mask_id).sum()) == 0 and first.max() < 32
    known = torch.full((2, 256), dec.vocab.mask_id)
    known[:, :40] = torch.randint(0, 32, (2, 40))
    filled = dec.sample_ids(slots.slots, known, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filled[:, :40], known[:, :40]) and (filled != dec.vocab.mask_id).all()
    g = torch.Generator().manual_seed(0)
    images = dec.generate(slots, steps=2, generator=g)
    again = dec.generate(slots, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.equal(images, again)
    assert images.min() >= 0 and images.max() <= 1


def test_generation_remasks_on_mages_cosine_schedule() -> None:
    model, _ = make_model(*RANDOM)
    model.eval()
    dec = model.decoder
    seen: list[int] = []
    original = dec.encoder.encode_ids

    def spy(ids, kept=None):
        seen.append(int((ids == dec.vocab.mask_id).sum(1)[0]))
        return original(ids, kept)

    dec.encoder.encode_ids = spy  # type: ignore[method-assign]
    dec.sample_ids(None, steps=5, batch=1, generator=torch.Generator().manual_seed(0))
    # step t starts with floor(256 cos(pi/2 t/5)) unknown ids (the previous step's mask_len)
    assert seen == [256] + [math.floor(256 * math.cos(math.pi / 2 * t / 5)) for t in range(1, 5)]


# ---------------------------------------------------------------- bad input


def test_vocabulary_mismatch_fails_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mage-tiny.pth"
    write_official(path, codebook=64, vqgan_codebook=32)
    with pytest.raises(DataError, match="vocabulary mismatch") as err:
        make_model(f"encoder.checkpoint={path}", *TOKENIZER)
    assert "\n" not in str(err.value)
    from ocl_bench.run.importing import import_checkpoint

    with pytest.raises(DataError, match="vocabulary mismatch"):
        import_checkpoint("mage", path, tmp_path / "run", ["importer.num_heads=2"])


def test_wrong_or_missing_checkpoint_fails_in_one_line(tmp_path: Path, monkeypatch) -> None:
    from ocl_bench.run.importing import import_checkpoint

    monkeypatch.delenv("OCL_BENCH_MAGE", raising=False)
    with pytest.raises(DataError, match="mage-vitb-1600.pth") as err:
        make_model(*TOKENIZER)
    assert "\n" not in str(err.value) and "OCL_BENCH_MAGE" in str(err.value)
    spot_like = tmp_path / "spot.pth"
    torch.save({"model": {"slot_attn.slot_mu": torch.zeros(1, 1, 4)}}, spot_like)
    with pytest.raises(DataError, match="not an official MAGE checkpoint") as err:
        import_checkpoint("mage", spot_like, tmp_path / "run", [])
    assert "\n" not in str(err.value)
    with pytest.raises(IncompatiblePluginsError, match="features.masked_tokens"):
        make_model(*RANDOM, masking="none")


def test_cli_import_reports_a_bad_file_in_one_line(tmp_path: Path, capsys) -> None:
    from ocl_bench.cli import main

    bad = tmp_path / "mage-vitb-1600.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["import", "mage", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mage-vitb-1600.pth" in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- presets and training

SHRUNK = [
    "dataset.name=shapes",
    "dataset.image_size=32",
    "dataset.train_size=4",
    "dataset.val_size=2",
    "encoder.random_init=true",
    "encoder.image_size=32",
    "encoder.embed_dim=32",
    "encoder.depth=2",
    "encoder.num_heads=2",
    *TOKENIZER,
    "grouping.slot_dim=16",
    "grouping.mlp_hidden=16",
    "decoder.num_layers=1",
    "decoder.num_heads=2",
    "train.steps=2",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.device=cpu",
    "train.threads=1",
]


def test_thesis_stage1_shrunk_trains_and_stores_the_frozen_encoder_as_a_hash(tmp_path) -> None:
    from safetensors.torch import load_file

    from ocl_bench.run.config import load_config
    from ocl_bench.run.train import train

    cfg = load_config("thesis-stage1", SHRUNK)
    assert cfg.encoder.name == "mage_vitb16" and cfg.encoder.params.masking == "none"
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.weight_decay == 0.05
    assert cfg.train.batch_size == 2 and cfg.grouping.params.num_slots == 7
    assert train(cfg, tmp_path / "run", progress=False).step == 2
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert any(k.startswith("decoder.bos_tokens") for k in weights)
    assert not any(k.startswith("encoder.") and "weight" in k for k in weights)  # frozen: hashed


def test_stage2_step_trains_decoder_and_slots_from_the_masked_loss(tmp_path) -> None:
    model, cfg = make_model(*RANDOM)
    model.train()
    objective = cfg.objectives[0].cls(cfg.objectives[0].params)
    batch = Batch(images=torch.rand(2, 3, 32, 32))
    loss = objective(model(batch), batch, Progress(0, 1))["token_cross_entropy"]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(not n.startswith("encoder.") for n in grads)  # frozen encoder
    assert grads["decoder.slot_proj.weight"].abs().sum() > 0  # slots condition the decoder
    assert any(
        n.startswith("grouping.") and g is not None and g.abs().sum() > 0 for n, g in grads.items()
    )


def test_decoder_is_a_generative_decoder_with_its_sampling_protocol() -> None:
    from ocl_bench.api.contracts import GenerativeDecoder

    model, _ = make_model(*RANDOM, "decoder.steps=20", "decoder.temperature=6.0")
    assert isinstance(model.decoder, GenerativeDecoder)
    protocol = model.decoder.sampling_protocol(None, 3.0)
    assert protocol["steps"] == 20 and protocol["choice_temperature"] == 6.0
    assert protocol["guidance_scale"] is None and protocol["generated_resolution"] == [32, 32]
