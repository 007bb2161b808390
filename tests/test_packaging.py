"""ocl-bench installs under one namespace: a research repository's own `tasks/` or
`encoders/` packages neither break our plugins nor get imported in their place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("ocl-bench")


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """A directory like a user's research code, with packages named as our folders."""
    for name in ("tasks", "encoders", "bench", "decoders"):
        pkg = tmp_path / name
        pkg.mkdir()
        # importing one of these instead of ours fails loudly
        (pkg / "__init__.py").write_text(f"raise ImportError('the user package {name}')\n")
        (pkg / "object_discovery.py").write_text("raise ImportError('user module')\n")
    return tmp_path


def _plugins(command: list[str], cwd: Path) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the user's packages come first
    out = subprocess.run(
        [*command, "plugins", "--json"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return {p["name"]: p for p in json.loads(out.stdout)}


@pytest.mark.parametrize("how", ["script", "module"])
def test_plugins_load_beside_a_users_own_tasks_and_encoders(user_repo: Path, how: str) -> None:
    command = [str(SCRIPT)] if how == "script" else [sys.executable, "-m", "ocl_bench.cli"]
    if how == "script" and not SCRIPT.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    found = _plugins(command, user_repo)
    broken = {n: p["error"] for n, p in found.items() if p["broken"]}
    assert not broken
    for name in ("cnn", "dino_vits16", "object_discovery", "property_prediction", "mlp", "shapes"):
        assert found[name]["distribution"] == "ocl-bench", name


def test_leaderboards_and_presets_come_with_the_package() -> None:
    """Found through the installed package, not a checkout's relative path."""
    import ocl_bench
    from ocl_bench.report.leaderboard import leaderboard_dir, list_leaderboards
    from ocl_bench.run.config import preset_names

    names = {p.stem for p in list_leaderboards()}
    assert {"shapes-demo", "thesis-table-5-1", "glass-table-3"} <= names
    assert leaderboard_dir().parent == Path(ocl_bench.__file__).resolve().parent.parent or (
        leaderboard_dir().parent == Path(ocl_bench.__file__).resolve().parent
    )
    assert {"spot-coco", "dinosaur-mlp-coco"} <= set(preset_names())
