"""Trainer hooks: plugin parameter groups, objectives seeing the step, gradient
accumulation, EMA of weights, frozen modules stored as a hash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import tomli_w
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ocl_bench.api.contracts import Progress
from ocl_bench.api.errors import DataError
from ocl_bench.api.plugin import ModelPart
from ocl_bench.decoders.mlp import MLPDecoder
from ocl_bench.objectives.reconstruction import Reconstruction
from ocl_bench.run import checkpoint
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import load_config, read_toml
from ocl_bench.run.evaluate import load_run
from ocl_bench.run.train import lr_factor, parameter_groups, train
from tests.conftest import TINY

# learned queries: no slot-init noise, so splitting a batch changes nothing but rounding
NO_NOISE = [*TINY, "grouping.init=learned_queries"]


def model_file(run: Path) -> Path:
    return run / "checkpoint" / checkpoint.MODEL_FILE


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_file(run)))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def optimizer_groups(run: Path) -> list[dict]:
    state = torch.load(run / "checkpoint" / checkpoint.STATE_FILE, weights_only=True)
    return state["optimizer"]["param_groups"]


# --- parameter groups ------------------------------------------------------------------


class _Block(nn.Module, ModelPart):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 1)
        self.scale = nn.Parameter(torch.ones(1, 1, 4))


def test_no_decay_norm_bias_exempts_norm_weights_and_every_bias() -> None:
    block = _Block()
    over = ["train.weight_decay=0.05", "train.no_decay_norm_bias=true"]
    settings = load_config(None, over).train
    groups = parameter_groups(settings, [("decoder 'x'", block)])
    names = {id(p): n for n, p in block.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_decay[0.0] == {
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "attn.in_proj_bias",
        "attn.out_proj.bias",
    }
    assert by_decay[0.05] == {"proj.weight", "attn.in_proj_weight", "attn.out_proj.weight", "scale"}
    # off: one group, every parameter decays
    plain = parameter_groups(load_config(None, over[:1]).train, [("decoder 'x'", block)])
    assert len(plain) == 1 and plain[0]["weight_decay"] == 0.05
    assert len(plain[0]["params"]) == len(list(block.parameters()))


def test_plugin_groups_get_their_own_lr_and_decay_and_reject_double_claims() -> None:
    block = _Block()
    block.param_groups = lambda: [  # type: ignore[method-assign]
        {"params": block.proj.parameters(), "lr_scale": 0.1, "weight_decay": 0.5},
        {"params": [block.scale], "lr": 1e-2, "weight_decay_scale": 2.0, "eps": 1e-6},
    ]
    settings = load_config(None, ["train.lr=1e-3", "train.weight_decay=0.01"]).train
    default, proj, scale = parameter_groups(settings, [("decoder 'x'", block)])
    assert default["lr"] == 1e-3 and default["weight_decay"] == 0.01
    assert len(default["params"]) == len(list(block.parameters())) - 3
    assert proj["lr"] == pytest.approx(1e-4) and proj["weight_decay"] == 0.5
    assert scale["lr"] == 1e-2 and scale["weight_decay"] == 0.02 and scale["eps"] == 1e-6
    block.param_groups = lambda: [{"params": [block.scale]}, {"params": [block.scale]}]
    with pytest.raises(ValueError, match="already in decoder 'x' param_groups"):
        parameter_groups(settings, [("decoder 'x'", block)])


def test_decoder_param_group_lr_follows_the_schedule_and_betas_reach_adam(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def frozen_by_lr(self: MLPDecoder) -> list[dict]:
        return [{"params": self.parameters(), "lr_scale": 0.0, "name": "decoder"}]

    monkeypatch.setattr(MLPDecoder, "param_groups", frozen_by_lr, raising=False)
    over = [*TINY, "train.steps=3", "train.betas=[0.8, 0.95]", "train.decay_half_life=2"]
    cfg = load_config(None, over)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg, (32, 32)).state_dict()
    train(cfg, tmp_path / "run", progress=False)
    after = weights(tmp_path / "run")
    # lr 0 for the decoder group: untouched; the rest trained at the scheduled lr
    assert all(torch.equal(after[k], initial[k]) for k in after if k.startswith("decoder."))
    assert any(not torch.equal(after[k], initial[k]) for k in after if k.startswith("grouping."))
    default, decoder = optimizer_groups(tmp_path / "run")
    assert decoder["name"] == "decoder" and decoder["initial_lr"] == 0.0
    assert default["lr"] == pytest.approx(cfg.train.lr * lr_factor(cfg.train, 3))
    assert default["betas"] == decoder["betas"] == (0.8, 0.95)


# --- progress and gradient accumulation --------------------------------------------------


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    calls: list[tuple[int, int, int]] = []
    original = Reconstruction.forward

    def recording(self, out, batch, progress: Progress):
        calls.append((progress.step, progress.total, batch.size))
        return original(self, out, batch, progress)

    monkeypatch.setattr(Reconstruction, "forward", recording)
    return calls


def test_objectives_see_step_and_total_and_accumulation_halves_the_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_calls(monkeypatch)
    train(load_config(None, [*NO_NOISE, "train.steps=3"]), tmp_path / "one", progress=False)
    assert calls == [(0, 3, 8), (1, 3, 8), (2, 3, 8)]
    calls.clear()
    over = [*NO_NOISE, "train.steps=3", "train.accumulate=2"]
    train(load_config(None, over), tmp_path / "two", progress=False)
    assert calls == [(0, 3, 4), (0, 3, 4), (1, 3, 4), (1, 3, 4), (2, 3, 4), (2, 3, 4)]


def test_accumulate_2_with_half_batches_trains_as_accumulate_1(tmp_path: Path) -> None:
    train(load_config(None, [*NO_NOISE, "train.steps=3"]), tmp_path / "one", progress=False)
    over = [*NO_NOISE, "train.steps=3", "train.accumulate=2"]
    train(load_config(None, over), tmp_path / "two", progress=False)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-6, msg=k)
    # the logged loss is the global-batch loss, not one micro-batch's
    logs = [
        [json.loads(x)["loss"] for x in (tmp_path / r / "train_log.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    assert logs[1] == pytest.approx(logs[0], rel=1e-4)
    # and the micro-batches are really different data: a third, unaccumulated run on the
    # first half of each batch only would train differently
    train(
        load_config(None, [*NO_NOISE, "train.steps=3", "train.batch_size=4"]), tmp_path / "h", False
    )
    half = weights(tmp_path / "h")
    assert any(not torch.allclose(half[k], one[k], rtol=1e-4, atol=2e-6) for k in one)


def test_accumulate_must_split_the_batch() -> None:
    from ocl_bench.api.errors import ConfigError

    with pytest.raises(ConfigError, match="accumulate"):
        load_config(None, [*TINY, "train.accumulate=3"])


# --- EMA -------------------------------------------------------------------------------


def test_ema_is_the_average_of_the_weights_and_evaluation_uses_it(tmp_path: Path) -> None:
    over = [*TINY, "train.steps=1", "train.ema_decay=0.9", "train.warmup_steps=0"]
    cfg = load_config(None, over)
    torch.manual_seed(cfg.seed)
    initial = dict(build_model(cfg, (32, 32)).named_parameters())
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    raw = weights(run)
    ema = load_file(str(run / "checkpoint" / checkpoint.EMA_FILE))
    assert ema.keys() == {k for k, p in initial.items() if p.requires_grad}
    for k, avg in ema.items():
        torch.testing.assert_close(avg, 0.9 * initial[k].detach() + 0.1 * raw[k])
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    # evaluation loads the averaged weights; train.ema_decay=0 gives the raw ones back
    _, model, _ = load_run(run)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), ema[k]), k
    _, plain, _ = load_run(run, ["train.ema_decay=0"])
    for k, p in plain.named_parameters():
        assert torch.equal(p.detach(), raw[k]), k


def test_ema_run_killed_and_resumed_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = [*TINY, "train.steps=7", "train.ema_decay=0.8", "train.eval_every=2"]
    over += ["train.eval_images=8"]
    train(load_config(None, over), tmp_path / "full", progress=False)
    # a crash at step 5 (after the checkpoint of step 3), then the same command again
    original, calls = Reconstruction.forward, {"n": 0}

    def crashing(self, out, batch, progress):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, out, batch, progress)

    monkeypatch.setattr(Reconstruction, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, over), tmp_path / "split", progress=False)
    assert (tmp_path / "split" / "checkpoint" / checkpoint.DONE_FILE).read_text() == "3"
    monkeypatch.setattr(Reconstruction, "forward", original)
    result = train(load_config(None, over), tmp_path / "split", progress=False)
    assert result.resumed_from == 3
    assert_same(weights(tmp_path / "full"), weights(tmp_path / "split"))
    ema = [
        load_file(str(tmp_path / r / "checkpoint" / checkpoint.EMA_FILE)) for r in ("full", "split")
    ]
    assert_same(*ema)
    # the validation probe scored the averaged weights, identically in both runs
    logs = [(tmp_path / r / "eval_log.jsonl").read_text() for r in ("full", "split")]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 3


# --- frozen modules ----------------------------------------------------------------------

VIT = ["encoder.name=dino_vits16", "encoder.embed_dim=64", "encoder.depth=2"]
VIT += ["encoder.num_heads=2", "encoder.image_size=32", "decoder.target=features"]
VIT += ["tasks={}", "train.threads=1", "dataset.image_size=32", "train.batch_size=4"]
VIT += ["train.warmup_steps=1", "train.checkpoint_every=2"]


@pytest.fixture
def vit_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pretrained-weights file of the tiny ViT, and no caches of the user's."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("OCL_BENCH_WEIGHTS_DINO_VITS16", raising=False)
    torch.manual_seed(3)
    vit = timm.create_model(
        "vit_small_patch16_224.dino",
        pretrained=False,
        num_classes=0,
        img_size=32,
        embed_dim=64,
        depth=2,
        num_heads=2,
    )
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def test_frozen_encoder_is_stored_as_a_hash_and_resume_stays_bitwise(
    tmp_path: Path, vit_weights: Path
) -> None:
    over = [*VIT, f"encoder.weights={vit_weights}"]
    cfg = load_config(None, [*over, "train.steps=4"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    model = build_model(cfg, (32, 32))
    encoder_bytes = sum(p.numel() * p.element_size() for p in model.encoder.parameters())
    trainable_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad
    )
    stored = weights(run)
    assert not any(k.startswith("encoder.") for k in stored)
    # the file holds the trainable weights and not the encoder's (they outweigh the rest)
    assert encoder_bytes > trainable_bytes
    size = model_file(run).stat().st_size
    assert trainable_bytes <= size < trainable_bytes + encoder_bytes // 2
    with safe_open(str(model_file(run)), "pt") as fh:
        recorded = json.loads(fh.metadata()["frozen"])
    assert recorded == {"encoder": checkpoint.parameter_sha256(model.encoder)}
    # evaluation rebuilds the encoder from its weights file
    _, loaded, step = load_run(run)
    assert step == 4
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v), k
    # resuming (from the checkpoint of step 2) gives the uninterrupted run's weights
    train(load_config(None, [*over, "train.steps=2"]), tmp_path / "split", progress=False)
    train(cfg, tmp_path / "split", progress=False)
    assert_same(weights(run), weights(tmp_path / "split"))


def test_changed_frozen_weights_fail_loading_in_one_line(tmp_path: Path, vit_weights: Path) -> None:
    run = tmp_path / "run"
    over = [*VIT, f"encoder.weights={vit_weights}", "train.steps=1"]
    train(load_config(None, over), run, progress=False)
    state = load_file(str(vit_weights))
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"] + 1e-3
    save_file(state, str(vit_weights))
    with pytest.raises(DataError) as err:
        load_run(run)
    message = str(err.value)
    assert "\n" not in message
    assert "frozen module 'encoder'" in message and "pretrained weights changed" in message
    # resuming refuses the same way instead of training on with other features
    with pytest.raises(DataError, match="pretrained weights changed"):
        train(load_config(None, [*over[:-1], "train.steps=2"]), run, progress=False)


def test_frozen_submodules_are_the_outermost_all_frozen_ones() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.ReLU())
    assert checkpoint.frozen_modules(net) == []
    net[1].requires_grad_(False)
    assert checkpoint.frozen_modules(net) == ["1"]  # not "1.0" again, not the ReLUs
    net.requires_grad_(False)
    assert checkpoint.frozen_modules(net) == ["0", "1"]  # the root itself is never one


def test_a_run_written_before_new_settings_existed_still_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.steps=2"]), run, progress=False)
    # drop the settings this change added, as a config.toml written before it would be
    path = run / "config.toml"
    raw = read_toml(path)
    for key in ("accumulate", "betas", "no_decay_norm_bias", "ema_decay"):
        del raw["train"][key]
    path.write_text(tomli_w.dumps(raw))
    assert "betas" not in path.read_text() and "ema_decay" not in path.read_text()
    result = train(load_config(None, [*TINY, "train.steps=3"]), run, progress=False)
    assert result.resumed_from == 2
    # a real change is still refused
    from ocl_bench.api.errors import ConfigError

    with pytest.raises(ConfigError, match="train.ema_decay"):
        train(load_config(None, [*TINY, "train.steps=4", "train.ema_decay=0.5"]), run, False)


def test_two_processes_accumulating_train_as_one_process_on_the_whole_batch(
    tmp_path: Path,
) -> None:
    """Each rank computes 2 micro-batches of 2 images, gradients synchronised once per step
    (no_sync before the last micro-batch); the step equals one process's batch of 8."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = [*NO_NOISE, "train.steps=3", "train.batch_size=8", "--no-eval", "-q"]
    base = [sys.executable, "-m", "ocl_bench.cli", "train"]
    subprocess.run([*base, "--out", str(tmp_path / "one"), *args], check=True, env=env)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    launch = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ocl_bench.cli", "train"]
    subprocess.run(
        [*launch, "--out", str(tmp_path / "ddp"), *args, "train.accumulate=2"],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    logs = [
        [json.loads(x)["loss"] for x in (tmp_path / r / "train_log.jsonl").read_text().splitlines()]
        for r in ("one", "ddp")
    ]
    assert len(logs[1]) == 3 and logs[1] == pytest.approx(logs[0], rel=1e-4)
