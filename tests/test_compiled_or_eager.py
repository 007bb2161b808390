"""train.compile's wrapper: the RNG snapshot for an eager retry is taken only while one
can still be needed (until a call of that input signature has run compiled)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ocl_bench.api.contracts import Batch
from ocl_bench.run.train import CompiledOrEager, call_signature


class NoisyModule(nn.Module):
    """Draws from the global RNG as slot initialisation does."""

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch.images.mean() + torch.randn(3)


def batch(size: int, side: int = 4) -> Batch:
    return Batch(images=torch.rand(size, 3, side, side), captions=["a red cube"] * size)


@pytest.fixture
def snapshots(monkeypatch) -> list[int]:
    """Counts the RNG snapshots (torch.get_rng_state calls)."""
    taken: list[int] = []
    original = torch.get_rng_state

    def counted() -> torch.Tensor:
        taken.append(1)
        return original()

    monkeypatch.setattr(torch, "get_rng_state", counted)
    return taken


def test_no_snapshot_once_a_signature_ran_compiled(monkeypatch, snapshots) -> None:
    # "compiling" returns the module itself: every compiled call succeeds
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: module)
    forward = CompiledOrEager(NoisyModule())
    forward(batch(2))
    assert len(snapshots) == 1
    for _ in range(3):  # same shapes, other values and captions: no new trace, no snapshot
        b = batch(2)
        b.captions = ["another caption", "x"]
        forward(b)
    assert len(snapshots) == 1
    forward(batch(1))  # a smaller last batch traces again: a retry is possible again
    assert len(snapshots) == 2
    forward(batch(1))
    forward(batch(2, side=4))
    assert len(snapshots) == 2
    forward(Batch(images=torch.rand(2, 3, 4, 4, dtype=torch.float64)))  # dtype, no captions
    assert len(snapshots) == 3


def test_a_failed_recompile_is_retried_eagerly_from_the_same_rng_state(monkeypatch) -> None:
    module = NoisyModule()

    def compile_failing_on_batch_of_one(m, *a, **k):
        def compiled(b: Batch) -> torch.Tensor:
            if b.size == 1:
                torch.randn(100)  # a half-traced call moves the RNG before it fails
                raise RuntimeError("recompile exploded")
            return m(b)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_failing_on_batch_of_one)
    forward = CompiledOrEager(module)
    b2, b1 = batch(2), batch(1)
    torch.manual_seed(0)
    forward(b2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = forward(b1)
    torch.manual_seed(0)
    module(b2)
    assert torch.equal(got, module(b1))  # bitwise the eager call from the same state
    assert forward.failed and len([w for w in caught if "recompile exploded" in str(w.message)])


def test_an_error_of_a_signature_that_ran_compiled_propagates(monkeypatch) -> None:
    calls = {"n": 0}

    def compile_failing_at_third_call(m, *a, **k):
        def compiled(b: Batch) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 3:
                raise FloatingPointError("the model's own error")
            return m(b)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_failing_at_third_call)
    forward = CompiledOrEager(NoisyModule())
    forward(batch(2))
    forward(batch(2))
    with pytest.raises(FloatingPointError, match="the model's own error"):
        forward(batch(2))
    assert not forward.failed


def test_signature_follows_what_compile_specialises_on() -> None:
    a, b = batch(2), batch(2)
    b.captions = ["other", "words"]
    assert call_signature(((a,), {})) == call_signature(((b,), {}))
    assert call_signature(((a,), {})) != call_signature(((batch(3),), {}))
    c = batch(2)
    c.images.requires_grad_(True)
    assert call_signature(((a,), {})) != call_signature(((c,), {}))
    assert call_signature(((a,), {"k": 1})) != call_signature(((a,), {"k": 2}))
