"""The whole plugin contract.

A distribution exposes modules through the "ocl_bench" entry-point group; each module
implements this hook and returns its plugin classes (see bench.plugin.Plugin).
"""

from __future__ import annotations

import pluggy

PROJECT = "ocl_bench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ocl_bench_plugins() -> list[type]:
    """Return the plugin classes this module provides."""
