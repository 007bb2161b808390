"""The training loop's throughput line, its TensorBoard event file and train.compile's fallback."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocl_bench.run.config import load_config
from ocl_bench.run.event_log import EVENT_DIR
from ocl_bench.run.throughput import ThroughputMeter
from ocl_bench.run.train import train
from tests.conftest import TINY


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _events(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / EVENT_DIR))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_log_carries_throughput_and_tensorboard_holds_the_same_scalars(tmp_path: Path) -> None:
    run = tmp_path / "run"
    over = ["train.steps=4", "train.eval_every=4", "train.eval_images=8"]
    train(load_config(None, [*TINY, *over]), run, progress=False)
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for record in log:
        assert 0.0 <= record["data_wait"] <= 1.0
        assert record["step_s"] > 0
        # images_per_s is the global batch over the step time
        assert record["images_per_s"] == pytest.approx(8 / record["step_s"], rel=1e-6)
    loss = _events(run, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert [s for s, _ in _events(run, "throughput/data_wait")] == [1, 2, 3, 4]
    assert [v for _, v in _events(run, "train/lr")] == pytest.approx([r["lr"] for r in log])
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    key = next(k for k in evals[0] if "fg_ari" in k)
    measured = _events(run, f"val/{key}")
    assert [s for s, _ in measured] == [e["step"] for e in evals] == [4]
    assert [v for _, v in measured] == pytest.approx([e[key] for e in evals], rel=1e-6)


def test_tensorboard_can_be_switched_off(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.steps=1", "train.tensorboard=false"]), run, False)
    assert not (run / EVENT_DIR).exists()
    assert "images_per_s" in _log(run)[0]


def test_a_killed_and_resumed_run_logs_every_step_once(tmp_path: Path, monkeypatch) -> None:
    from ocl_bench.objectives import reconstruction

    original = reconstruction.Reconstruction.forward
    calls = {"n": 0}

    def killed_at_step_5(self, out, batch, progress):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as a kill after step 4 was logged, checkpoint at 3
        return original(self, out, batch, progress)

    monkeypatch.setattr(reconstruction.Reconstruction, "forward", killed_at_step_5)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, [*TINY, "train.steps=6"]), run, progress=False)
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4]
    monkeypatch.setattr(reconstruction.Reconstruction, "forward", original)
    result = train(load_config(None, [*TINY, "train.steps=6"]), run, progress=False)
    assert result.resumed_from == 3
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    loss = _events(run, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]  # step 4 of the killed run is purged
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in log], rel=1e-6)


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    eager = tmp_path / "eager"
    train(load_config(None, [*TINY, "train.steps=3"]), eager, progress=False)

    def broken_compile(module, *args, **kwargs):
        def compiled(*a, **k):
            torch.randn(100)  # draws from the RNG before failing, as a half-traced call may
            raise RuntimeError("backend exploded\nlong traceback that must not be shown")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    run = tmp_path / "compiled"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_config(None, [*TINY, "train.steps=3", "train.compile=true"]), run, False)
    ours = [w for w in caught if "train.compile" in str(w.message)]
    assert len(ours) == 1
    assert "backend exploded" in str(ours[0].message) and "\n" not in str(ours[0].message)
    a = load_file(str(eager / "checkpoint" / "model.safetensors"))
    b = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compile_that_raises_at_once_falls_back_too(tmp_path: Path, monkeypatch) -> None:
    def unavailable(*args, **kwargs):
        raise RuntimeError("Windows not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", unavailable)
    with pytest.warns(RuntimeWarning, match="train.compile: cannot compile .*Windows"):
        train(load_config(None, [*TINY, "train.steps=1", "train.compile=true"]), tmp_path, False)
    assert _log(tmp_path)[0]["step"] == 1


def test_meter_counts_only_marked_waits() -> None:
    import time

    meter = ThroughputMeter()
    meter.start()
    with meter.waiting():
        time.sleep(0.02)
    time.sleep(0.02)
    figures = meter.stop(images=4)
    assert 0.25 < figures["data_wait"] < 0.75
    assert figures["images_per_s"] == pytest.approx(4 / figures["step_s"])


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_clip_gradients_equals_torch_clip_grad_norm(norm: str) -> None:
    from ocl_bench.run.train import clip_gradients

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in ((30, 7), (5,), (2, 3, 4))]
    ours.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours[:3], theirs[:3]):
        a.grad = torch.randn(a.shape, generator=g) * 3
        b.grad = a.grad.clone()
    norm_type = float("inf") if norm == "inf" else 2.0
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.3, norm_type=norm_type)
    total = clip_gradients(ours, 0.3, norm)
    assert torch.equal(total, expected) and float(total) > 0.3  # clipping happened
    for a, b in zip(ours[:3], theirs[:3]):
        assert torch.equal(a.grad, b.grad)


def test_fused_optimizer_is_used_and_steps_like_foreach() -> None:
    from ocl_bench.run.train import make_optimizer

    settings = load_config(None, TINY).train
    weights = [torch.nn.Parameter(torch.randn(40, 9)), torch.nn.Parameter(torch.randn(9))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = make_optimizer(settings, [{"params": weights}], torch.device("cpu"))
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(copies, lr=settings.lr, weight_decay=settings.weight_decay)
    for _ in range(3):
        for a, b in zip(weights, copies):
            a.grad = torch.sin(a.detach() * 3)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(weights, copies):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))
