"""ocl-bench: a plugin-based benchmark harness for object-centric learning."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, overload

if TYPE_CHECKING:
    from ocl_bench.encoders.mage import TokenMasks
    from ocl_bench.run.compose import SlotModel
    from ocl_bench.run.evaluate import LoadedRun

__version__ = "0.1.0"

# The core was one flat package until 0.2; these paths (documented, and imported by
# third-party plugins) keep working as aliases of the modules' new homes: the same module
# object, so `ocl_bench.contracts.Batch is ocl_bench.api.contracts.Batch`.
MOVED: dict[str, str] = {
    **{
        f"ocl_bench.{name}": f"ocl_bench.api.{name}"
        for name in (
            "contracts errors hookspecs layers matching params plugin runtime tasking"
            " tokenizing weights"
        ).split()
    },
    **{
        f"ocl_bench.{name}": f"ocl_bench.run.{name}"
        for name in (
            "boards checkpoint compose config data distributed ema evaluate event_log"
            " feature_cache figures grid importing protocol registry slot_library store"
            " throughput train"
        ).split()
    },
    **{
        f"ocl_bench.{name}": f"ocl_bench.report.{name}"
        for name in "board_figures compare conclusion leaderboard report_html stats".split()
    },
    **{
        f"ocl_bench.datasets.{name}": f"ocl_bench.datasets.generated.{name}"
        for name in ("generate", "pseudo_masks", "captions")
    },
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module at its new one."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its new name; importing binds the old name to it.
        pass


if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    sys.meta_path.append(_MovedModule())


@overload
def load_run(
    run_dir: str | Path, overrides: list[str] | None = None, *, with_config: Literal[False] = ...
) -> SlotModel: ...
@overload
def load_run(
    run_dir: str | Path, overrides: list[str] | None = None, *, with_config: Literal[True]
) -> LoadedRun: ...
def load_run(
    run_dir: str | Path, overrides: list[str] | None = None, *, with_config: bool = False
) -> SlotModel | LoadedRun:
    """The trained model of a run directory (its forward gives typed ModelOutput).

    with_config=True returns a LoadedRun instead: `.model`, `.config` (the resolved
    RunConfig the run was trained with), `.step`, and `.objectives()` / `.tasks()` rebuilt
    as the run had them::

        run = ocl_bench.load_run("runs/x", with_config=True)
        losses = run.objectives()  # the run's objectives, with their saved state
        for task in run.tasks(): ...

    `overrides` are applied on top of the run's config (e.g. ["train.ema_decay=0"]).
    """
    from ocl_bench.run.evaluate import open_run

    loaded = open_run(run_dir, overrides)
    return loaded if with_config else loaded.model


def __getattr__(name: str) -> object:
    # Public types, imported on first use so `import ocl_bench` stays light.
    if name == "LoadedRun":
        from ocl_bench.run.evaluate import LoadedRun

        return LoadedRun
    if name == "TokenMasks":
        from ocl_bench.encoders.mage import TokenMasks

        return TokenMasks
    raise AttributeError(f"module 'ocl_bench' has no attribute {name!r}")


__all__ = ["LoadedRun", "TokenMasks", "__version__", "load_run"]
