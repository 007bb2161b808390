"""Training: bitwise determinism, resume after kill -9, NaN stop, run directory contents."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocl_bench.api.errors import ConfigError, TrainingDiverged
from ocl_bench.run import checkpoint
from ocl_bench.run.config import load_config
from ocl_bench.run.evaluate import evaluate_run, load_run
from ocl_bench.run.train import lr_factor, train
from tests.conftest import TINY


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def spot_cosine_scheduler(base: float, final: float, total: int, warmup: int) -> list[float]:
    """SPOT's utils_spot.cosine_scheduler written out per iteration (an independent check)."""
    warm = [base * i / (warmup - 1) for i in range(warmup)] if warmup > 1 else [0.0] * warmup
    n = total - warmup
    rest = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return warm + rest


@pytest.mark.parametrize("steps,warmup", [(50, 10), (1000, 0), (7, 1), (92400, 9240)])
def test_cosine_schedule_is_spots_cosine_scheduler(steps: int, warmup: int) -> None:
    over = [f"train.steps={steps}", f"train.warmup_steps={warmup}", "train.schedule=cosine"]
    t = load_config(None, [*over, "train.lr=4e-4", "train.min_lr=4e-7"]).train
    expected = spot_cosine_scheduler(4e-4, 4e-7, steps, warmup)
    got = [t.lr * lr_factor(t, s) for s in range(steps)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if warmup > 1:
        assert got[0] == 0.0 and got[warmup - 1] == pytest.approx(4e-4)
    assert got[warmup] == pytest.approx(4e-4)
    assert got[-1] < 4e-4 * 0.1
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1 :]))


def test_half_life_after_warmup_is_oclfs_exponential_decay_after_warmup() -> None:
    over = ["train.schedule=half_life_after_warmup", "train.steps=500000"]
    over += ["train.warmup_steps=10000", "train.decay_half_life=100000"]
    t = load_config(None, over).train
    # OCLF: min(1, s / W) during the warm-up, then 0.5 ** ((s - W) / 100000)
    assert lr_factor(t, 0) == 0.0 and lr_factor(t, 5000) == 0.5
    assert lr_factor(t, 10000) == 1.0
    assert lr_factor(t, 110000) == pytest.approx(0.5)
    assert lr_factor(t, 310000) == pytest.approx(0.125)
    # the plain half-life schedule counts the decay from step 0
    plain = load_config(None, [*over[1:], "train.schedule=half_life"]).train
    assert lr_factor(plain, 110000) == pytest.approx(0.5**1.1)


def test_cosine_schedule_needs_steps_after_warmup() -> None:
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, ["train.schedule=cosine", "train.steps=10", "train.warmup_steps=10"])


def test_training_logs_the_cosine_lr_of_every_step(tmp_path: Path) -> None:
    over = [*TINY, "train.steps=6", "train.warmup_steps=2", "train.schedule=cosine"]
    cfg = load_config(None, [*over, "train.min_lr=1e-5"])
    train(cfg, tmp_path / "a", progress=False)
    log = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    lrs = [json.loads(line)["lr"] for line in log]
    expected = spot_cosine_scheduler(cfg.train.lr, 1e-5, 6, 2)
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[0] == 0.0 and lrs[-1] < cfg.train.lr / 2


def test_measuring_while_training_changes_nothing_and_is_logged_and_plotted(
    tmp_path: Path,
) -> None:
    from PIL import Image

    over = [*TINY, "train.steps=4", "train.checkpoint_every=2"]
    train(load_config(None, over), tmp_path / "plain", progress=False)
    measured = [*over, "train.eval_every=2", "train.eval_images=8"]
    train(load_config(None, measured), tmp_path / "m", progress=False)
    # the measurements run under a forked RNG: the weights are bitwise those of the plain run
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "m"))
    rows = [json.loads(x) for x in (tmp_path / "m" / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert 0 <= r["object_discovery.decoder.fg_ari"] <= 1
        assert 0 <= r["object_discovery.attn.mbo_i"] <= 1
    assert not (tmp_path / "plain" / "eval_log.jsonl").exists()
    # the curves: one panel for the plain run, a second for the measured one
    with Image.open(tmp_path / "plain" / "figures" / "training.png") as one:
        single = one.size
    with Image.open(tmp_path / "m" / "figures" / "training.png") as two:
        two.load()
        assert two.size[0] > 1.8 * single[0] and two.size[1] == single[1]
    # a longer rerun resumes at step 4 and measures 6 once; lines past the resume point go
    with open(tmp_path / "m" / "eval_log.jsonl", "a") as log:
        log.write(json.dumps({"step": 9, "object_discovery.decoder.fg_ari": 0.5}) + "\n")
    train(load_config(None, [*measured, "train.steps=6"]), tmp_path / "m", progress=False)
    log_lines = (tmp_path / "m" / "eval_log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log_lines]
    assert steps == [2, 4, 6]


def test_same_config_twice_gives_bitwise_identical_weights(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.steps=5"])
    train(cfg, tmp_path / "a", progress=False)
    train(load_config(None, [*TINY, "train.steps=5"]), tmp_path / "b", progress=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # and a different seed really changes them
    train(load_config(None, [*TINY, "train.steps=5", "seed=1"]), tmp_path / "c", progress=False)
    a, c = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_in_process_matches_uninterrupted(tmp_path: Path) -> None:
    full = load_config(None, [*TINY, "train.steps=7"])
    train(full, tmp_path / "full", progress=False)
    # Train 3 steps (one checkpoint), then ask for 7 in the same directory.
    train(load_config(None, [*TINY, "train.steps=3"]), tmp_path / "split", progress=False)
    result = train(load_config(None, [*TINY, "train.steps=7"]), tmp_path / "split", progress=False)
    assert result.resumed_from == 3
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "split"))
    log = (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 8))


def _cli(out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ocl_bench.cli",
        "train",
        "--out",
        str(out),
        "--no-eval",
        "-q",
        *TINY,
        f"train.steps={steps}",
        "train.checkpoint_every=2",
    ]


def test_kill_9_then_rerun_gives_identical_weights(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    steps = 12
    subprocess.run(_cli(tmp_path / "full", steps), check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, steps), env=env, stderr=subprocess.DEVNULL)
    done = run / "checkpoint" / checkpoint.DONE_FILE
    deadline = time.time() + 300
    while time.time() < deadline:
        if done.exists() and int(done.read_text() or 0) >= 4:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    killed_at = int(done.read_text()) if done.exists() else 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < killed_at < steps, "the run should have been killed halfway"

    subprocess.run(_cli(run, steps), check=True, env=env, capture_output=True)
    assert_same_weights(weights(tmp_path / "full"), weights(run))


def test_kill_between_checkpoint_renames_is_recovered(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.steps=3"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    ckpt = run / "checkpoint"
    # Simulate a kill after the old checkpoint was moved aside but before the new one
    # was renamed into place.
    ckpt.rename(ckpt.with_name("checkpoint.new"))
    assert checkpoint.recover(ckpt) == ckpt
    assert (ckpt / checkpoint.MODEL_FILE).exists()
    # A half-written new checkpoint (no COMPLETE marker) is ignored in favour of the old.
    half = ckpt.with_name("checkpoint.new")
    half.mkdir()
    (half / checkpoint.MODEL_FILE).write_bytes(b"partial")
    assert checkpoint.recover(ckpt) == ckpt
    assert not half.exists()


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    from ocl_bench.objectives import reconstruction

    original = reconstruction.Reconstruction.forward
    calls = {"n": 0}

    def poisoned(self, out, batch, progress):
        calls["n"] += 1
        losses = original(self, out, batch, progress)
        if calls["n"] == 5:
            return {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(reconstruction.Reconstruction, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="at step 5") as err:
        train(load_config(None, [*TINY, "train.steps=8"]), run, progress=False)
    assert "step 3" in str(err.value)  # the last checkpoint (every 3 steps) is named
    assert (run / "checkpoint" / checkpoint.DONE_FILE).read_text() == "3"
    state = weights(run)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_run_directory_contents_and_eval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.steps=3"]), run, progress=False)
    metrics = evaluate_run(run, progress=False)
    assert (run / "config.toml").is_file()
    assert (run / "checkpoint" / "model.safetensors").is_file()
    assert (run / "checkpoint" / "state.pt").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["step"] == 3 and saved["dataset"] == "shapes"
    keys = set(saved["summary"])
    for source in ("decoder", "attn"):
        for metric in ("fg_ari", "mbo_i", "mbo_c", "miou", "corloc", "detection_rate"):
            assert f"object_discovery.{source}.{metric}" in keys
    assert "property_prediction.decoder.shape_acc" in keys
    for path in saved["figures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Evaluation is deterministic for a given checkpoint.
    again = evaluate_run(run, progress=False)
    assert again["summary"].keys() == metrics["summary"].keys()
    for key, value in metrics["summary"].items():
        assert again["summary"][key] == value or (
            math.isnan(value) and math.isnan(again["summary"][key])
        )
    # The saved config reloads to the same resolved config.
    cfg, model, step = load_run(run)
    assert step == 3 and cfg.digest() == load_config(None, [*TINY, "train.steps=3"]).digest()


def test_rerun_with_a_different_config_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.steps=2"]), run, progress=False)
    with pytest.raises(ConfigError, match="grouping.num_slots"):
        train(
            load_config(None, [*TINY, "train.steps=2", "grouping.num_slots=5"]), run, progress=False
        )


def test_checkpoints_load_weights_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.steps=1"]), run, progress=False)
    # A pickle with arbitrary objects must be refused by the weights-only loader.
    state_path = run / "checkpoint" / "state.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 1, "evil": Evil()}, state_path)
    from ocl_bench.api.errors import DataError

    with pytest.raises(DataError, match="state.pt"):
        checkpoint.load_state(state_path)
