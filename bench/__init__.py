"""ocl-bench: a plugin-based benchmark harness for object-centric learning."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

if TYPE_CHECKING:
    from ocl_bench.compose import SlotModel
    from ocl_bench.encoders.mage import TokenMasks
    from ocl_bench.evaluate import LoadedRun

__version__ = "0.1.0"


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
    from ocl_bench.evaluate import open_run

    loaded = open_run(run_dir, overrides)
    return loaded if with_config else loaded.model


def __getattr__(name: str) -> object:
    # Public types, imported on first use so `import ocl_bench` stays light.
    if name == "LoadedRun":
        from ocl_bench.evaluate import LoadedRun

        return LoadedRun
    if name == "TokenMasks":
        from ocl_bench.encoders.mage import TokenMasks

        return TokenMasks
    raise AttributeError(f"module 'ocl_bench' has no attribute {name!r}")


__all__ = ["LoadedRun", "TokenMasks", "__version__", "load_run"]
