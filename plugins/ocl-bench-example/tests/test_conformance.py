"""This distribution's plugins pass ocl-bench's conformance suite: what a third-party plugin
author runs from their own tests (`pip install -e .`, then `pytest tests`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocl_bench.testing import check_plugin, conformance_cases

# Every plugin this distribution registers (its entry points), found through ocl-bench's
# registry exactly as `ocl-bench train` finds them.
CASES = conformance_cases(distribution="ocl-bench-example")


def test_the_distribution_registers_its_plugins() -> None:
    assert sorted(str(c) for c in CASES) == ["encoder:patch_linear", "task:slot_usage"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_plugin_conforms(case, tmp_path: Path) -> None:
    report = check_plugin(case, fixtures=tmp_path)
    assert "save/load" in report.checks or case.kind == "task"
