"""The out-of-tree example distribution: installing it adds plugins, uninstalling removes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY

EXAMPLE = Path(__file__).resolve().parent.parent / "plugins" / "ocl-bench-example"


def _plugins() -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "ocl_bench.cli", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {p["name"]: p for p in json.loads(out.stdout)}


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True
    )


def test_install_use_and_uninstall_example_plugin(tmp_path: Path) -> None:
    assert "patch_linear" not in _plugins()
    _pip("install", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE))
    try:
        found = _plugins()
        assert found["patch_linear"]["kind"] == "encoder"
        assert found["patch_linear"]["distribution"] == "ocl-bench-example"
        assert found["slot_usage"]["kind"] == "task"
        assert set(found["patch_linear"]["params"]) == {"patch_size", "dim"}
        run = tmp_path / "run"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ocl_bench.cli",
                "train",
                "--out",
                str(run),
                "-q",
                *TINY,
                "train.steps=2",
                "encoder.name=patch_linear",
                "tasks={slot_usage={}}",
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        metrics = json.loads((run / "metrics.json").read_text())["summary"]
        assert 1 <= metrics["slot_usage.attn.slots_used"] <= 4
        assert 0.25 <= metrics["slot_usage.attn.confidence"] <= 1.0
        # The distribution's own tests: ocl-bench's conformance suite over its plugins, run
        # as its author runs them (its pyproject.toml points pytest at tests/).
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
            capture_output=True,
            text=True,
            env=env,
            cwd=EXAMPLE,
        )
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
        assert "3 passed" in tests.stdout, tests.stdout[-3000:]
    finally:
        _pip("uninstall", "-y", "ocl-bench-example")
    assert "patch_linear" not in _plugins()
