"""autocast_dtype (api/runtime.py), the one helper feature caches key their precision on,
with torch >= 2.4's get_autocast_dtype and without it (torch 2.2/2.3)."""

from __future__ import annotations

import pytest
import torch

from ocl_bench.api.runtime import autocast, autocast_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# the torch 2.2/2.3 queries the fallback uses are deprecated in the torch installed here
pytestmark = pytest.mark.filterwarnings("ignore:torch.*autocast.*deprecated:DeprecationWarning")


def both_ways(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str | None, str | None]]:
    """(CPU, CUDA) answers now with get_autocast_dtype, and without it as in torch 2.2/2.3;
    it is hidden only around the queries, since torch.autocast itself calls it."""
    answers = {"torch>=2.4": (autocast_dtype(CPU), autocast_dtype(CUDA))}
    with monkeypatch.context() as old:
        old.delattr(torch, "get_autocast_dtype")
        answers["torch<2.4"] = (autocast_dtype(CPU), autocast_dtype(CUDA))
    return answers


def test_none_outside_autocast(monkeypatch) -> None:
    assert set(both_ways(monkeypatch).values()) == {(None, None)}


def test_the_dtype_inside_autocast_on_that_device_only(monkeypatch) -> None:
    with autocast(CPU, "bf16"):
        answers = both_ways(monkeypatch)
    assert set(answers.values()) == {("torch.bfloat16", None)}
    assert set(both_ways(monkeypatch).values()) == {(None, None)}


def test_fp32_runs_without_autocast(monkeypatch) -> None:
    with autocast(CPU, "fp32"):
        assert set(both_ways(monkeypatch).values()) == {(None, None)}


def test_the_fallback_asks_the_per_device_queries(monkeypatch) -> None:
    monkeypatch.delattr(torch, "get_autocast_dtype")
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: True)
    monkeypatch.setattr(torch, "get_autocast_cpu_dtype", lambda: torch.float16)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda: True)  # no argument: CUDA
    monkeypatch.setattr(torch, "get_autocast_gpu_dtype", lambda: torch.bfloat16)
    assert autocast_dtype(CPU) == "torch.float16"
    assert autocast_dtype(CUDA) == "torch.bfloat16"
    assert autocast_dtype(torch.device("meta")) is None
