"""The core's layering: api <- run <- report <- cli (and testing, beside the CLI), checked on
the source.

- a module imports only from its own layer and the layers below it (the api imports
  nothing from run or report; run nothing from report);
- no import of ocl_bench sits inside a function in api, run or report (a function-level
  import is how a cycle hides); the CLI imports its commands lazily, for start-up time;
- the module-level imports of the core have no cycle;
- the core imports no plugin module by name (plugins come through the registry).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# ocl_bench.testing (the conformance suite plugin authors run) sits beside the CLI: it
# builds runs, so it reads run; nothing of the core imports it.
LAYERS = {"api": 0, "run": 1, "report": 2, "cli": 3, "testing": 3}
PLUGIN_PACKAGES = (
    "datasets",
    "encoders",
    "groupings",
    "decoders",
    "objectives",
    "tasks",
    "importers",
    "image_tokenizers",
)
# The one place the core names a plugin module: `ocl-bench generate`, the GLASS generator's
# command line, which is a dataset-making tool rather than a plugin kind.
CLI_PLUGIN_IMPORTS = {
    "ocl_bench.datasets.generated.generate",
    "ocl_bench.datasets.generated.pseudo_masks",
}


def _core_modules() -> dict[str, Path]:
    found = {}
    for path in sorted(BENCH.rglob("*.py")):
        rel = path.relative_to(BENCH).with_suffix("")
        if rel.parts[0] not in LAYERS:
            continue
        parts = [p for p in rel.parts if p != "__init__"]
        found["ocl_bench." + ".".join(parts)] = path
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _package(module: str) -> str:
    """The folder under ocl_bench a module lives in ('' for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ocl_bench module, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ocl_bench"):
            # `from ocl_bench.api import hookspecs` imports the module ocl_bench.api.hookspecs
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((target if _is_module(target) else node.module, id(node) in inside))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ocl_bench"):
                    found.append((alias.name, id(node) in inside))
    return found


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    base = BENCH if parts[0] in LAYERS else ROOT
    return (base.joinpath(*parts).with_suffix(".py")).is_file() or (
        base.joinpath(*parts) / "__init__.py"
    ).is_file()


MODULES = _core_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    own = _layer(module)
    upward = [
        target
        for target, _ in _imports(MODULES[module])
        if _package(target) in LAYERS and (_layer(target) or 0) > own
    ]
    assert not upward, f"{module} (layer {own}) imports from a layer above it: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) != LAYERS["cli"]))
def test_no_import_inside_a_function(module: str) -> None:
    hidden = [target for target, nested in _imports(MODULES[module]) if nested]
    assert not hidden, f"{module} imports inside a function (a hidden cycle?): {hidden}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_core_names_no_plugin(module: str) -> None:
    named = {
        target for target, _ in _imports(MODULES[module]) if _package(target) in PLUGIN_PACKAGES
    }
    if _layer(module) == LAYERS["cli"]:
        named -= CLI_PLUGIN_IMPORTS
    assert not named, f"{module} imports plugin modules by name: {sorted(named)}"


def test_no_import_cycle() -> None:
    graph = {
        m: {t for t, nested in _imports(p) if not nested and t in MODULES and t != m}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # the parser finds a nested import and a plain one (guards against a vacuous pass)
    src = tmp_path / "m.py"
    src.write_text(
        "from ocl_bench.report.stats import summarize\n"
        "def f():\n    from ocl_bench.run.store import ResultStore\n"
    )
    assert _imports(src) == [("ocl_bench.report.stats", False), ("ocl_bench.run.store", True)]


def test_old_flat_paths_are_the_new_modules() -> None:
    import importlib

    import ocl_bench

    for old, new in ocl_bench.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from ocl_bench.contracts import Batch  # what third-party plugins have always written

    assert Batch is importlib.import_module("ocl_bench.api.contracts").Batch
