"""The `vqgan` tokenizer against MAGE's own VQGAN (github.com/LTH14/mage), when present.

Opt-in: point OCL_BENCH_MAGE_REPO at a checkout of the official repository. Its
`taming.models.vqgan.VQModel` is imported (nothing is copied here) and built with a tiny
config; its weights are written as the official `vqgan_jax_strongaug.ckpt` layout
({"state_dict": ...}), loaded by our plugin with no sizes given, and both run on the
same images: token ids must be equal and decoded images agree to 1e-5. The reverse
direction holds too: a file written from our tokenizer loads into VQModel strictly.

VQModel subclasses pytorch_lightning.LightningModule for its training hooks only; when
pytorch_lightning is not installed the test stands in an nn.Module for it.

    git clone https://github.com/LTH14/mage /tmp/mage
    OCL_BENCH_MAGE_REPO=/tmp/mage python -m pytest tests/test_official_mage_vqgan.py
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from ocl_bench.image_tokenizers.vqgan import OFFICIAL_FILE, VQGANTokenizer
from ocl_bench.run.registry import build_tokenizer

REPO = os.environ.get("OCL_BENCH_MAGE_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "taming" / "models" / "vqgan.py").is_file(),
    reason="set OCL_BENCH_MAGE_REPO to a checkout of github.com/LTH14/mage",
)
# The official config (config/vqgan.yaml) at tiny sizes: three levels, so the encoder
# average-pools twice, and channel changes in both directions exercise the shortcut quirk.
DDCONFIG = {
    "double_z": False,
    "z_channels": 32,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.0,
}
N_EMBED, EMBED_DIM = 64, 32


@pytest.fixture(scope="module")
def vqmodel_cls():
    pytest.importorskip("einops")
    saved = {k: v for k, v in sys.modules.items() if k == "taming" or k.startswith("taming.")}
    stub = None
    try:
        importlib.import_module("pytorch_lightning")
    except ImportError:
        stub = types.ModuleType("pytorch_lightning")
        stub.LightningModule = nn.Module
        sys.modules["pytorch_lightning"] = stub
    sys.path.insert(0, REPO)
    try:
        module = importlib.import_module("taming.models.vqgan")
        yield module.VQModel
    finally:
        sys.path.remove(REPO)
        if stub is not None:
            sys.modules.pop("pytorch_lightning", None)
        for k in [k for k in sys.modules if k == "taming" or k.startswith("taming.")]:
            sys.modules.pop(k)
        sys.modules.update(saved)


def _official(vqmodel_cls, seed: int, ckpt: Path | None = None) -> nn.Module:
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints z shapes and load notes
        model = vqmodel_cls(
            ddconfig=DDCONFIG,
            n_embed=N_EMBED,
            embed_dim=EMBED_DIM,
            ckpt_path=None if ckpt is None else str(ckpt),
        )
    return model.eval()


def _randomise(model: nn.Module) -> None:
    """Non-trivial GroupNorm affines and a spread codebook (the official init is +-1/n)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
        model.quantize.embedding.weight.normal_()


def test_ids_and_decoded_images_match_the_official_vqgan(vqmodel_cls, tmp_path: Path) -> None:
    official = _official(vqmodel_cls, seed=0)
    _randomise(official)
    path = tmp_path / OFFICIAL_FILE
    torch.save({"state_dict": official.state_dict()}, path)
    ours = build_tokenizer("vqgan", {"checkpoint": str(path)}, "tokenizer")
    assert isinstance(ours, VQGANTokenizer)
    assert (ours.params.ch, ours.params.ch_mult, ours.vocab_size) == (32, (1, 1, 2), N_EMBED)

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_official = official.encoder(x)
        _, _, (_, _, official_ids) = official.encode(x)
        b, c, h, w = z_official.shape
        codes = official.quantize.get_codebook_entry(official_ids, shape=(b, h, w, c))
        official_images = official.decode(codes).clamp(0, 1)
    ids = ours.encode(x)
    assert ids.shape == (4, 8, 8)
    assert len(ids.unique()) > 4  # the comparison is not between constant grids
    assert torch.allclose(ours.encoder(x), z_official, atol=1e-5)
    assert torch.equal(ids.reshape(-1), official_ids)
    assert torch.allclose(ours.embed(ids), codes, atol=0)
    assert torch.allclose(ours.decode(ids), official_images, atol=1e-5)


def test_a_file_written_from_our_tokenizer_loads_into_vqmodel(vqmodel_cls, tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = build_tokenizer(
        "vqgan",
        {
            "random_init": True,
            "ch": 32,
            "ch_mult": [1, 1, 2],
            "n_embed": N_EMBED,
            "embed_dim": EMBED_DIM,
        },
        "tokenizer",
    )
    _randomise(ours)
    path = tmp_path / OFFICIAL_FILE
    torch.save({"state_dict": ours.state_dict()}, path)
    official = _official(vqmodel_cls, seed=3, ckpt=path)  # VQModel loads strict=True
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, _, (_, _, official_ids) = official.encode(x)
    assert torch.equal(ours.encode(x).reshape(-1), official_ids)
