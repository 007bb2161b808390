"""Helpers of the opt-in equality tests against official repository checkouts: importing
from a checkout, and the stand-ins the official models are built around.

Several official repositories (latent-slot-diffusion, GLASS, Dataset Diffusion) name their
top-level package `src`: a test imports from its checkout with the other `src` packages
set aside and put back, so the tests run in any order in one process.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from torch import Tensor, nn


def checkout_from_env(var: str, marker: str, url: str) -> tuple[str, pytest.MarkDecorator]:
    """(the checkout path in environment variable `var`, or "", and a skip mark for a test
    module): the tests are skipped, with a message naming `var` and the repository at `url`,
    unless `var` names a folder holding the file `marker` (a path inside the checkout)."""
    repo = os.environ.get(var, "")
    mark = pytest.mark.skipif(
        not repo or not (Path(repo) / marker).is_file(),
        reason=f"set {var} to a checkout of {url}",
    )
    return repo, mark


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


@contextmanager
def omegaconf_resolvers_restored() -> Iterator[None]:
    """OmegaConf resolvers registered inside the block are cleared after it.

    OCLF's ocl/cli/_config.py registers its resolvers on import, and registering a name twice
    fails: a test importing it leaves the registry as it found it, so the next one can import
    it again. OmegaConf lists resolvers only in a private registry, read here."""
    from omegaconf import OmegaConf
    from omegaconf.basecontainer import BaseContainer

    before = set(BaseContainer._resolvers)
    try:
        yield
    finally:
        for name in set(BaseContainer._resolvers) - before:
            OmegaConf.clear_resolver(name)


def multihead_stevesa(repo: str) -> type:
    """MultiHeadSTEVESA from src/models/slot_attn.py of a GLASS or latent-slot-diffusion
    checkout (GLASS's is LSD's with init_mlp added); the test is skipped without einops.
    distinctipy, which only utils.random_colors (visualisation) uses, is stubbed."""
    pytest.importorskip("einops")
    with checkout_on_path(repo, stubs=("distinctipy",)):
        from src.models.slot_attn import MultiHeadSTEVESA
    return MultiHeadSTEVESA


def dino_hub_like_vit(img_size: int, embed_dim: int, depth: int, num_heads: int) -> nn.Module:
    """timm's ViT/16 with DINO's `prepare_tokens` and the same state_dict keys as the DINO
    hub model, which the official SPOT code calls."""
    from timm.models.vision_transformer import VisionTransformer

    class DinoHubLike(VisionTransformer):
        def prepare_tokens(self, x: Tensor) -> Tensor:
            return self._pos_embed(self.patch_embed(x))

    return DinoHubLike(
        img_size=img_size,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
