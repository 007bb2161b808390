"""ocl-bench's SLATE against the official code (github.com/singhgautam/slate), when present.

Opt-in: point OCL_BENCH_SLATE_REPO at a checkout of the official repository. The official
SLATE model is built at tiny sizes and imported (nothing of it is copied here); its dVAE
state_dict loads into the `dvae` tokenizer unchanged, its decoder weights map by name onto
the `slate` decoder, and both must give the same dVAE logits and reconstructions, the same
transformer logits and cross-entropy on the same tokens and slots, and the same greedy
tokens as the official decoding loop (which recomputes the prefix for every token).

    git clone https://github.com/singhgautam/slate /tmp/slate
    OCL_BENCH_SLATE_REPO=/tmp/slate python -m pytest tests/test_official_slate.py
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ocl_bench.api.contracts import Dims
from ocl_bench.api.params import build_params
from ocl_bench.decoders.slate import SlateDecoder, SlateParams

REPO = os.environ.get("OCL_BENCH_SLATE_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "slate.py").is_file(),
    reason="set OCL_BENCH_SLATE_REPO to a checkout of github.com/singhgautam/slate",
)
SIZE, VOCAB, D, SLOT = 16, 16, 32, 8


@pytest.fixture(scope="module")
def official():
    # The official modules import each other by top-level names ("utils", "transformer");
    # keep them out of sys.modules afterwards so no other test sees them.
    names = ("utils", "dvae", "transformer", "slot_attn", "slate")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, REPO)
    try:
        slate = importlib.import_module("slate")
    finally:
        sys.path.remove(REPO)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    torch.manual_seed(0)
    args = argparse.Namespace(
        num_slots=3,
        vocab_size=VOCAB,
        d_model=D,
        img_channels=3,
        image_size=SIZE,
        dropout=0.0,
        num_iterations=1,
        slot_size=SLOT,
        mlp_hidden_size=16,
        pos_channels=4,
        num_slot_heads=1,
        num_dec_blocks=2,
        num_heads=2,
    )
    return slate.SLATE(args).eval()


def _ours(model) -> SlateDecoder:
    values = {"d_model": D, "num_layers": 2, "num_heads": 2, "vocab_size": VOCAB, "dropout": 0.0}
    dec = SlateDecoder(
        build_params(SlateParams, values, "decoder"), Dims(image_size=(SIZE, SIZE), slot_dim=SLOT)
    )
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("self_attn_mask"):  # a stored bool mask; ours is built on the fly
            continue
        key = key.replace("dvae.", "tokenizer.", 1) if key.startswith("dvae.") else key
        key = key.replace("tf_dec.", "", 1).replace("dictionary.dictionary.", "dictionary.")
        key = key.replace("positional_encoder.pe", "pe")
        if not key.startswith("slot_attn."):
            state[key] = value
    dec.load_state_dict(state, strict=True)
    return dec.eval()


def test_dvae_matches(official) -> None:
    dec = _ours(official)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        theirs = F.log_softmax(official.dvae.encoder(images), 1)
        assert torch.allclose(dec.tokenizer.log_probs(images), theirs, atol=1e-6)
        ids = theirs.argmax(1)
        assert torch.equal(dec.tokenizer.encode(images), ids)
        one_hot = F.one_hot(ids, VOCAB).permute(0, 3, 1, 2).float()
        expected = official.dvae.decoder(one_hot).clamp(0, 1)
        assert torch.allclose(dec.tokenizer.decode(ids), expected, atol=1e-6)


def test_transformer_logits_and_cross_entropy_match(official) -> None:
    dec = _ours(official)
    n = (SIZE // 4) ** 2
    ids = torch.randint(0, VOCAB, (2, n))
    slots = torch.randn(2, 3, SLOT)
    with torch.no_grad():
        target = F.one_hot(ids, VOCAB).float()
        # the official input: one-hot over vocab + 1 with BOS at entry 0, then position
        inputs = torch.cat([torch.zeros_like(target[..., :1]), target], -1)
        inputs = torch.cat([torch.zeros_like(inputs[:, :1]), inputs], 1)
        inputs[:, 0, 0] = 1.0
        emb = official.positional_encoder(official.dictionary(inputs))
        pred = official.out(official.tf_dec(emb[:, :-1], official.slot_proj(slots)))
        ours, _ = dec.logits(slots, ids)
        assert torch.allclose(ours, pred, atol=1e-5)
        theirs_ce = -(target * torch.log_softmax(pred, -1)).flatten(1).sum(-1).mean()
        ours_ce = F.cross_entropy(ours.flatten(0, 1), ids.flatten(), reduction="sum") / 2
        assert torch.allclose(ours_ce, theirs_ce, atol=1e-4)


def test_greedy_tokens_match_the_official_loop(official) -> None:
    dec = _ours(official)
    slots = torch.randn(2, 3, SLOT)
    n = (SIZE // 4) ** 2
    with torch.no_grad():
        memory = official.slot_proj(slots)
        inputs = torch.zeros(2, 1, VOCAB + 1)
        inputs[..., 0] = 1.0
        chosen = []
        for _ in range(n):  # as reconstruct_autoregressive: the whole prefix every step
            out = official.tf_dec(official.positional_encoder(official.dictionary(inputs)), memory)
            nxt = official.out(out)[:, -1].argmax(-1)
            chosen.append(nxt)
            step = F.one_hot(nxt + 1, VOCAB + 1).float()[:, None]
            inputs = torch.cat([inputs, step], 1)
        expected = torch.stack(chosen, 1).view(2, SIZE // 4, SIZE // 4)
        assert torch.equal(dec.sample_ids(slots), expected)
