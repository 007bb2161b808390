"""SLATE: the dvae tokenizer, the slate decoder, its objectives, training and its table rows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import ocl_bench
from ocl_bench.api.contracts import Batch, Dims, Features, ModelOutput, Progress, Slots
from ocl_bench.api.errors import DataError
from ocl_bench.api.params import build_params
from ocl_bench.cli import main
from ocl_bench.decoders.slate import SlateDecoder, SlateParams
from ocl_bench.image_tokenizers.dvae import DVAE, cosine_anneal, gumbel_softmax
from ocl_bench.objectives.token_cross_entropy import TokenCrossEntropy, TokenCrossEntropyParams
from ocl_bench.objectives.tokenizer_loss import TokenizerLoss, TokenizerLossParams
from ocl_bench.report.leaderboard import load_leaderboard
from ocl_bench.run import checkpoint
from ocl_bench.run.config import load_config
from ocl_bench.run.grid import Grid, load_grid, run_grid
from ocl_bench.run.registry import build_tokenizer
from ocl_bench.run.store import ResultStore

# The slate preset shrunk to seconds: shapes at 32 px (8x8 tokens), 32 codes, 1 block.
TINY_SLATE = [
    "dataset.name=shapes",
    "dataset.image_size=32",
    "dataset.train_size=8",
    "dataset.val_size=4",
    "encoder.channels=16",
    "encoder.dim=32",
    "grouping.num_slots=3",
    "grouping.slot_dim=32",
    "grouping.mlp_hidden=32",
    "decoder.d_model=32",
    "decoder.num_layers=1",
    "decoder.num_heads=2",
    "decoder.vocab_size=32",
    "decoder.tokenizer_channels=8",
    "decoder.tau_steps=4",
    "train.steps=3",
    "train.batch_size=2",
    "train.warmup_steps=10",
    "train.checkpoint_every=1",
    "train.threads=1",
    "eval.num_images=4",
    "eval.batch_size=4",
    "eval.figure_images=1",
    "tasks.object_discovery.mask_size=0",
]


def tiny_dvae(**values) -> DVAE:
    tok = build_tokenizer("dvae", {"vocab_size": 16, "channels": 8, **values}, "test")
    assert isinstance(tok, DVAE)
    return tok


def tiny_decoder(**values) -> SlateDecoder:
    base = {
        "d_model": 32,
        "num_layers": 2,
        "num_heads": 2,
        "vocab_size": 16,
        "tokenizer_channels": 8,
        "dropout": 0.0,
    }
    params = build_params(SlateParams, {**base, **values}, "decoder")
    return SlateDecoder(params, Dims(image_size=(16, 16), slot_dim=8)).eval()


def test_gumbel_relaxation_becomes_the_hard_sample_at_low_temperature() -> None:
    # seeded: drawn from the global RNG, the test depended on which tests ran before it
    log_probs = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    log_probs = log_probs.log_softmax(1)
    soft = gumbel_softmax(log_probs, 1e-3, False, 1, torch.Generator().manual_seed(0))
    warm = gumbel_softmax(log_probs, 1.0, False, 1, torch.Generator().manual_seed(0))
    assert torch.allclose(soft.sum(1), torch.ones(4, 3, 3))
    # same noise: the same winner, but only the cold sample is (nearly) one-hot
    assert torch.equal(soft.argmax(1), warm.argmax(1))
    assert soft.max(1).values.min() > 0.99 and warm.max(1).values.min() < 0.99
    hard_in = log_probs.clone().requires_grad_(True)
    hard = gumbel_softmax(hard_in, 1.0, True, 1)
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(
        hard.sum(1), torch.ones(4, 3, 3)
    )
    (hard * torch.randn_like(hard)).sum().backward()
    assert hard_in.grad is not None and hard_in.grad.abs().sum() > 0  # straight-through
    # peaked logits: the samples are the dVAE's argmax ids
    peaked = torch.full((2, 16, 2, 2), -50.0).scatter_(
        1, torch.tensor([3]).view(1, 1, 1, 1).expand(2, 1, 2, 2), 0.0
    )
    assert torch.equal(gumbel_softmax(peaked, 0.1, False, 1).argmax(1), torch.full((2, 2, 2), 3))


def test_temperature_schedule_follows_the_official_cosine() -> None:
    tok = tiny_dvae(tau_start=1.0, tau_final=0.1, tau_steps=30000)
    assert tok.tau == 1.0
    assert tok.temperature(0) == 1.0
    assert tok.temperature(15000) == pytest.approx(0.55)
    assert tok.temperature(7500) == pytest.approx(0.55 + 0.45 * math.cos(math.pi / 4))
    assert tok.temperature(30000) == pytest.approx(0.1) and tok.temperature(10**6) == 0.1
    tok.set_progress(Progress(15000, 100000))
    assert tok.tau == pytest.approx(0.55)
    assert cosine_anneal(5, 2.0, 1.0, 0) == 1.0  # no annealing steps: the final value
    with pytest.raises(Exception, match="tau_final"):
        tiny_dvae(tau_start=0.1, tau_final=1.0)


def test_dvae_keys_are_the_official_layout_and_load_from_a_slate_checkpoint(tmp_path) -> None:
    tok = tiny_dvae()
    block = ("m.weight", "weight", "bias")
    expected = {f"encoder.{i}.{k}" for i in range(7) for k in block}
    expected |= {"encoder.7.weight", "encoder.7.bias", "decoder.11.weight", "decoder.11.bias"}
    expected |= {f"decoder.{i}.{k}" for i in (0, 1, 2, 3, 4, 6, 7, 8, 9) for k in block}
    assert set(tok.state_dict()) == expected
    # a whole SLATE model's checkpoint: the dVAE under "dvae.", other modules beside it
    source = tiny_dvae()
    state = {f"dvae.{k}": v for k, v in source.state_dict().items()}
    state["slot_attn.slot_mu"] = torch.zeros(1, 1, 8)
    path = tmp_path / "slate.pt"
    torch.save({"model": state}, path)
    loaded = tiny_dvae(weights=str(path))
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images), source.encode(images))
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in state.items() if "decoder.11" not in k}, bad)
    with pytest.raises(DataError, match="decoder.11"):
        tiny_dvae(weights=str(bad))


def test_dvae_reconstruction_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    tok = tiny_dvae(tau_steps=0)  # the final temperature
    images = torch.rand(1, 3, 4, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)
    images = images.expand(4, 3, 16, 16)
    optimizer = torch.optim.Adam(tok.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = tok.losses(images)["dvae_mse"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    ids = tok.encode(images)
    assert ids.shape == (4, 4, 4) and ids.dtype == torch.long
    assert tok.decode(ids).shape == (4, 3, 16, 16)
    assert tok.embed(ids).shape == (4, 16, 4, 4)


def test_decoder_is_causal_and_conditioned_on_slots() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder()
    slots = torch.randn(2, 3, 8)
    ids = torch.randint(0, 16, (2, 16))
    logits, masks = dec.logits(slots, ids)
    assert logits.shape == (2, 16, 16) and masks.shape == (2, 16, 3)
    assert torch.allclose(masks.sum(-1), torch.ones(2, 16))
    i = 6
    changed = ids.clone()
    changed[:, i] = (ids[:, i] + 1) % 16
    other, _ = dec.logits(slots, changed)
    # position j predicts token j from tokens < j: token i reaches positions > i only
    assert torch.allclose(other[:, : i + 1], logits[:, : i + 1], atol=1e-6)
    assert not torch.allclose(other[:, i + 1], logits[:, i + 1], atol=1e-4)
    moved, _ = dec.logits(torch.randn(2, 3, 8), ids)
    assert not torch.allclose(moved, logits, atol=1e-4)


def test_forward_targets_objectives_and_param_groups() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder().train()
    images = torch.rand(2, 3, 16, 16)
    slots = Slots(slots=torch.randn(2, 3, 8), attn=torch.rand(2, 16, 3).softmax(-1))
    feats = Features(tokens=torch.zeros(2, 16, 8), grid=(4, 4))
    out = dec(slots, feats, Batch(images=images))
    assert out.predicted.all() and out.mask_grid == (4, 4)
    assert set(out.extras) == {"tokenizer_loss.dvae_mse"}
    model_out = ModelOutput(features=feats, slots=slots, decoding=out)
    mean = TokenCrossEntropy(build_params(TokenCrossEntropyParams, {}, "o"))(
        model_out, Batch(images)
    )
    summed = TokenCrossEntropy(
        build_params(TokenCrossEntropyParams, {"reduction": "sum_per_image"}, "o")
    )(model_out, Batch(images))
    n = out.target_ids.shape[1]
    assert float(summed["token_cross_entropy"].detach()) == pytest.approx(
        n * float(mean["token_cross_entropy"].detach()), rel=1e-5
    )
    aux = TokenizerLoss(build_params(TokenizerLossParams, {"weight": 2.0}, "o"))(
        model_out, Batch(images)
    )
    assert float(aux["dvae_mse"].detach()) == pytest.approx(
        2 * float(out.extras["tokenizer_loss.dvae_mse"].detach())
    )
    # the cross-entropy never reaches the dVAE; its own loss does
    summed["token_cross_entropy"].backward(retain_graph=True)
    assert all(p.grad is None for p in dec.tokenizer.parameters())
    assert dec.dictionary.weight.grad is not None
    aux["dvae_mse"].backward()
    assert dec.tokenizer.encoder[0].m.weight.grad.abs().sum() > 0
    # evaluation: argmax targets, no tokenizer loss
    dec.eval()
    ev = dec(slots, feats, Batch(images=images))
    assert ev.extras == {} and torch.equal(ev.target_ids, dec.tokenizer.encode(images).flatten(1))
    groups = dec.param_groups()
    assert [g["name"] for g in groups] == ["dvae"]
    assert groups[0]["lr"] == 3e-4 and groups[0]["constant_lr"]
    frozen = tiny_decoder(train_tokenizer=False, transformer_lr=3e-4)
    assert [g["name"] for g in frozen.param_groups()] == ["transformer"]
    assert not any(p.requires_grad for p in frozen.tokenizer.parameters())


def test_cached_generation_matches_teacher_forcing_and_is_seeded() -> None:
    torch.manual_seed(0)
    dec = tiny_decoder()
    slots = torch.randn(2, 3, 8)
    ids = dec.sample_ids(slots)
    logits, _ = dec.logits(slots, ids.flatten(1))
    assert torch.equal(logits.argmax(-1), ids.flatten(1))  # greedy = argmax of its own prefix
    s = Slots(slots=slots, attn=torch.rand(2, 16, 3))
    images = dec.generate(s)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    sampler = tiny_decoder(sampling="sample")
    sampler.load_state_dict(dec.state_dict())
    a = sampler.sample_ids(slots, torch.Generator().manual_seed(1))
    b = sampler.sample_ids(slots, torch.Generator().manual_seed(1))
    c = sampler.sample_ids(slots, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(
        sampler.generate(s, generator=torch.Generator().manual_seed(1)), dec.tokenizer.decode(a)
    )


def test_preset_values_and_sources() -> None:
    cfg = load_config("slate")
    d, t = cfg.decoder.params, cfg.train
    assert cfg.decoder.name == "slate" and cfg.encoder.name == "cnn"
    assert (d.d_model, d.num_layers, d.num_heads, d.vocab_size, d.dropout) == (192, 8, 4, 4096, 0.1)
    assert (d.tau_start, d.tau_final, d.tau_steps, d.tokenizer_lr) == (1.0, 0.1, 30000, 3e-4)
    assert (t.lr, t.warmup_steps, t.grad_clip, t.grad_clip_norm) == (1e-4, 30000, 1.0, "inf")
    assert {c.name: c.params.weight for c in cfg.objectives} == {
        "token_cross_entropy": 1.0,
        "tokenizer_loss": 1.0,
    }
    od = next(c for c in cfg.tasks if c.name == "object_discovery").params
    assert od.masks == ["attn"]
    text = (Path(ocl_bench.__file__).parent / "configs" / "presets" / "slate.toml").read_text()
    for line in text.splitlines():
        if re.match(r"^\w+ = ", line) and not line.startswith("name ="):
            assert "#" in line, f"no source comment on '{line}'"


def test_cli_training_follows_the_temperature_evaluates_and_generates(
    tmp_path, monkeypatch
) -> None:
    seen: list[int] = []
    original = DVAE.set_progress

    def spy(self: DVAE, progress: Progress) -> None:
        seen.append(progress.step)
        original(self, progress)

    monkeypatch.setattr(DVAE, "set_progress", spy)
    out = tmp_path / "run"
    generation = ['tasks.conditional_generation.fid="off"', "tasks.conditional_generation.seed=3"]
    assert main(["train", "slate", "--out", str(out), *TINY_SLATE, *generation]) == 0
    assert seen == [0, 1, 2]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["dvae_mse"] > 0 and r["token_cross_entropy"] > 0 for r in log)
    # the dVAE group keeps its lr while the default group warms up (10 steps)
    state = checkpoint.load_state(checkpoint.recover(out / "checkpoint") / checkpoint.STATE_FILE)
    lrs = state["scheduler"]["_last_lr"]
    assert lrs[0] == pytest.approx(1e-4 * 4 / 10) and lrs[1] == pytest.approx(3e-4)
    metrics = json.loads((out / "metrics.json").read_text())["summary"]
    assert 0.0 <= metrics["object_discovery.attn.fg_ari"] <= 1.0
    assert "object_discovery.attn.mbo_i" in metrics
    # images sampled from the slots (greedy tokens, dVAE decoder) against the real ones
    assert 0.0 < metrics["conditional_generation.psnr"] < 100.0
    assert -1.0 <= metrics["conditional_generation.ssim"] <= 1.0


def test_tiny_slate_row_of_thesis_table_5_1_lands_in_the_leaderboard(tmp_path) -> None:
    tiny = [*TINY_SLATE, "train.warmup_steps=1"]  # the table's cosine rows need W < steps
    grid = load_grid("thesis-table-5-1", tiny)
    cells = [c for c in grid.cells if c.row.startswith("SLATE")]
    assert [c.label for c in cells] == ["SLATE [coco as shapes]"]
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    assert run_grid(Grid(grid.name, cells), db, runs, progress=False) == {
        "SLATE [coco as shapes]": "complete"
    }
    cell = ResultStore(db).get(cells[0].config.digest())
    board = load_leaderboard("thesis-table-5-1", db, overrides=tiny)
    row = next(r for r in board.rows if r.label == "SLATE")
    assert row.missing is None and row.published == {"mbo_i": 29.1, "mbo_c": 33.6}
    for key in ("mbo_i", "mbo_c", "fg_ari"):
        assert row.measured[key] == pytest.approx(100 * cell.value("object_discovery", key, "attn"))
    assert Path(cell.run_dir, "metrics.json").is_file()
