"""Importing modules from an official repository checkout in the opt-in equality tests.

Several official repositories (latent-slot-diffusion, GLASS, Dataset Diffusion) name their
top-level package `src`: a test imports from its checkout with the other `src` packages
set aside and put back, so the tests run in any order in one process.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager


def _take_package(name: str) -> dict[str, types.ModuleType]:
    inside = [n for n in sys.modules if n == name or n.startswith(name + ".")]
    return {n: sys.modules.pop(n) for n in inside}


@contextmanager
def checkout_on_path(
    repo: str, package: str = "src", stubs: tuple[str, ...] = ()
) -> Iterator[None]:
    """`repo` first on sys.path while the block imports from it; empty modules stand in for
    `stubs` (third-party imports the compared code never calls) unless they are installed.
    Afterwards sys.path, the stubs and any module named `package` are as they were."""
    saved = _take_package(package)
    stubbed = [s for s in stubs if s not in sys.modules and importlib.util.find_spec(s) is None]
    for name in stubbed:
        sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, repo)
    try:
        yield
    finally:
        sys.path.remove(repo)
        for name in stubbed:
            sys.modules.pop(name, None)
        _take_package(package)
        sys.modules.update(saved)
