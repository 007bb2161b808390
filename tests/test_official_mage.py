"""`mage_vitb16` + `mage` against MAGE's own model (github.com/LTH14/mage), when present.

Opt-in: point OCL_BENCH_MAGE_REPO at a checkout of the official repository. Its
`models_mage.MaskedGenerativeEncoderViT` is imported (nothing is copied here) and built
at tiny sizes; its state_dict is saved as a MAGE checkpoint ({"model": ...}) and loaded
by our encoder (checkpoint=...) and decoder (pretrained=true, no slots: plain MAGE).
On the same weights and inputs the test compares, to 1e-5:

- the encoder output on all visible ids (the slot branch, and a generation step's input);
- the masked pass of `forward_encoder`: its own mask draw, given to our whole model as
  `TokenMasks` through the public `encoder.use_masks` (no private method);
- the decoder logits of that pass and of one generation step (all [MASK] and partly
  known ids), and the label-smoothed masked loss;
- the VQGAN decode of the ids: unclamped (`clamp=False`) as the official one, and our
  default clamped to [0, 1].

The official code needs a few things this environment lacks; the test stands them in
without copying code: `omegaconf` (OmegaConf.load returns the tiny VQGAN config),
`pytorch_lightning` (LightningModule = nn.Module), numpy's removed `np.float` alias,
and `.cuda()` (hard-coded in forward_encoder) as the identity on CPU.

    git clone https://github.com/LTH14/mage /tmp/mage
    OCL_BENCH_MAGE_REPO=/tmp/mage python -m pytest tests/test_official_mage.py
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ocl_bench.api.contracts import Batch, Progress
from ocl_bench.encoders.mage import TokenMasks
from ocl_bench.run.compose import build_model
from ocl_bench.run.config import load_raw, resolve

REPO = os.environ.get("OCL_BENCH_MAGE_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "models_mage.py").is_file(),
    reason="set OCL_BENCH_MAGE_REPO to a checkout of github.com/LTH14/mage",
)
# The official VQGAN config (config/vqgan.yaml) at tiny sizes: 32 px -> a 16x16 grid, so
# the official 257 position embeddings fit; codebook 64 moves the class and mask ids.
CODEBOOK = 64
VQGAN = {
    "embed_dim": 32,
    "n_embed": CODEBOOK,
    "ddconfig": {
        "double_z": False,
        "z_channels": 32,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}


def _attrs(value):
    if isinstance(value, dict):
        return types.SimpleNamespace(**{k: _attrs(v) for k, v in value.items()})
    return value


@pytest.fixture(scope="module")
def models_mage():
    pytest.importorskip("einops")
    names = ("models_mage", "taming", "util", "omegaconf", "pytorch_lightning")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
    config = _attrs({"model": {"params": {**VQGAN}}})
    config.model.params.ddconfig = dict(VQGAN["ddconfig"])  # VQModel unpacks it: **ddconfig
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.OmegaConf = types.SimpleNamespace(load=lambda path: config)
    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = nn.Module
    stubs = {"omegaconf": omegaconf, "pytorch_lightning": lightning}
    for name, stub in stubs.items():
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = stub
        elif name == "omegaconf":
            sys.modules[name] = stub  # the tiny config, not the repo's yaml
    sys.path.insert(0, REPO)
    try:
        yield importlib.import_module("models_mage")
    finally:
        sys.path.remove(REPO)
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            sys.modules.pop(k)
        sys.modules.update(saved)


@pytest.fixture()
def pair(models_mage, tmp_path: Path, monkeypatch):
    """(official model, our model) on the same weights, in eval mode."""
    monkeypatch.setattr(np, "float", float, raising=False)  # util/pos_embed.py uses np.float
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        official = models_mage.MaskedGenerativeEncoderViT(
            img_size=32,
            patch_size=2,  # only sizes the unused pos_embed / decoder_pred: 257 positions
            embed_dim=32,
            depth=2,
            num_heads=2,
            decoder_embed_dim=48,
            decoder_depth=2,
            decoder_num_heads=4,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            vqgan_ckpt_path=None,
        )
    with torch.no_grad():  # non-trivial values where the official init is constant
        for m in official.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
        official.mlm_layer.bias.normal_(0.0, 0.5)
        official.vqgan.quantize.embedding.weight.normal_()
        for blk in [*official.blocks, *official.decoder_blocks]:
            blk.attn.qkv.bias.normal_(0.0, 0.2)
    official.eval()
    path = tmp_path / "mage-tiny.pth"
    torch.save({"model": official.state_dict(), "epoch": 0}, path)
    overrides = [
        "dataset.image_size=32",
        "encoder.name=mage_vitb16",
        f"encoder.checkpoint={path}",
        "encoder.image_size=32",
        "encoder.num_heads=2",
        "encoder.masking=mage",
        "grouping.num_slots=3",
        "grouping.slot_dim=16",
        "grouping.mlp_hidden=16",
        "decoder.name=mage",
        "decoder.slots=none",
        "decoder.pretrained=true",
        f"decoder.checkpoint={path}",
        "decoder.num_heads=4",
    ]
    raw = load_raw(None, overrides)
    raw["objectives"] = {"token_cross_entropy": {"label_smoothing": 0.1}}
    raw["tasks"] = {}  # plain MAGE has no slots to evaluate
    cfg = resolve(raw)
    ours = build_model(cfg, (32, 32)).eval()
    return official, ours, cfg


def test_encoder_decoder_and_loss_match_the_official_mage(pair) -> None:
    official, ours, cfg = pair
    enc, dec = ours.encoder, ours.decoder
    assert (enc.vocab.fake_class_id, enc.vocab.mask_id) == (
        official.fake_class_label,
        official.mask_token_label,
    )
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = Batch(images=images)
    with torch.no_grad():
        # the masked pass: the official draw, replayed on ours through the public API
        # (TokenMasks takes the official float masks; their class-token column dropped)
        torch.manual_seed(2)
        np.random.seed(2)
        latent, gt, drop, hidden = official.forward_encoder(images)
        logits = official.forward_decoder(latent, drop, hidden)
        loss = official.forward_loss(gt, logits, hidden)
        masks = TokenMasks(masked=hidden[:, 1:], dropped=drop[:, 1:])
        with enc.use_masks(masks):
            out = ours(batch)
        ids = out.features.token_ids
        assert torch.equal(ids, gt) and len(ids.unique()) > 4
        assert 0 < int(masks.dropped.sum()) < int(masks.masked.sum())
        assert torch.allclose(out.features.masked_tokens, latent, atol=1e-5)
        assert torch.equal(out.decoding.predicted, hidden[:, 1:].bool())
        assert torch.allclose(out.decoding.logits, logits[:, 1:, :CODEBOOK], atol=1e-5)

        # MAGE's loss: our objective on our output
        objective = cfg.objectives[0].cls(cfg.objectives[0].params)
        ce = objective(out, batch, Progress(0, 1))["token_cross_entropy"]
        assert torch.allclose(ce, loss, atol=1e-5)

        # the VQGAN decode of these ids: the official one does not clamp, ours with
        # clamp=False equals it; by default ours is clamped to [0, 1]
        grid = ids.view(3, 16, 16)
        z_q = official.vqgan.quantize.get_codebook_entry(ids.reshape(-1), shape=(3, 16, 16, 32))
        decoded = official.vqgan.decode(z_q)
        assert decoded.min() < 0 or decoded.max() > 1  # the case where the two differ
        assert torch.allclose(enc.tokenizer.decode(grid, clamp=False), decoded, atol=1e-5)
        assert torch.allclose(enc.tokenizer.decode(grid), decoded.clamp(0, 1), atol=1e-5)

        # one generation step, from all [MASK] and from partly known ids
        for known in (0, 100):
            cur = torch.full((3, 256), official.mask_token_label, dtype=torch.long)
            cur[:, :known] = ids[:, :known]
            seq = torch.cat([torch.full((3, 1), official.fake_class_label), cur], 1)
            x = official.token_emb(seq)
            for blk in official.blocks:
                x = blk(x)
            x = official.norm(x)
            step_logits = official.forward_decoder(
                x, torch.zeros_like(seq), seq == official.mask_token_label
            )[:, 1:, :CODEBOOK]
            assert torch.allclose(enc.encode_ids(cur), x, atol=1e-5)
            unknown = cur == official.mask_token_label
            ours_step = dec.decode(enc.encode_ids(cur), None, unknown, None)[0][:, 1:, :CODEBOOK]
            assert torch.allclose(ours_step, step_logits, atol=1e-5)
