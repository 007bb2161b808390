"""The README's layout table is how a newcomer finds a module: every folder of the checkout
is in it, and its rule (a module's path follows its name: `ocl_bench.decoders.mlp` is
decoders/mlp.py, `ocl_bench.run.grid` is bench/run/grid.py) finds every module."""

from __future__ import annotations

import importlib
import subprocess
from importlib.machinery import PathFinder
from pathlib import Path

from tests.test_layering import PLUGIN_PACKAGES

ROOT = Path(__file__).resolve().parent.parent
CORE = ("api", "run", "report")


def _layout_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    return text[start : text.index("\n## ", start + 1)]


def _guess(module: str) -> Path:
    """The README's rule: core modules under bench/, every other folder at the top level."""
    parts = module.split(".")[1:]
    base = ROOT / "bench" if parts[0] in CORE or len(parts) == 1 else ROOT
    return base.joinpath(*parts).with_suffix(".py")


def test_every_top_level_folder_is_in_the_layout_table() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    folders = {p.split("/")[0] for p in tracked if "/" in p and not p.startswith(".")}
    table = _layout_table()
    missing = sorted(f for f in folders if f"`{f}/" not in table)
    assert not missing, f"folders missing from the README's layout table: {missing}"


def test_the_path_rule_finds_every_module() -> None:
    found = 0
    for folder in ("bench", *PLUGIN_PACKAGES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.stem == "__init__":
                continue
            rel = path.relative_to(ROOT / "bench" if folder == "bench" else ROOT)
            module = "ocl_bench." + ".".join(rel.with_suffix("").parts)
            # where Python finds it on disk (PathFinder skips sys.modules, which other
            # tests may have patched)
            parent = module.rpartition(".")[0]
            spec = PathFinder.find_spec(module, importlib.import_module(parent).__path__)
            assert spec is not None and spec.origin == str(path), module
            assert _guess(module) == path, f"{module}: the README's rule guesses {_guess(module)}"
            found += 1
    assert found > 80  # the walk saw the tree (86 modules when written)
