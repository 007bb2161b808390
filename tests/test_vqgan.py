"""The `vqgan` tokenizer: official key layout, strict loading, ids, decoding, freezing, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocl_bench.api.errors import ConfigError, DataError
from ocl_bench.image_tokenizers.vqgan import (
    ENV_VAR,
    OFFICIAL_FILE,
    VQGANParams,
    VQGANTokenizer,
)
from ocl_bench.run.checkpoint import frozen_modules
from ocl_bench.run.feature_cache import FeatureCache, sample_ids
from ocl_bench.run.registry import build_tokenizer

# A tiny tokenizer: 16x16 images -> 4x4 ids over 32 codes; two levels with a channel
# change in each direction, so both nin_shortcut blocks and an upsample exist.
TINY = {"ch": 8, "ch_mult": [1, 2, 2], "n_embed": 32, "embed_dim": 8, "norm_groups": 4}


def tiny(seed: int = 0, **extra: object) -> VQGANTokenizer:
    torch.manual_seed(seed)
    tok = build_tokenizer("vqgan", {"random_init": True, **TINY, **extra}, "tokenizer")
    assert isinstance(tok, VQGANTokenizer)
    # The official codebook init is tiny (+-1/n); spread it so ids depend on the image.
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()
    return tok


def images(n: int = 3, side: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# Official key names and shapes at the official sizes (../shared/reference/spot-and-mage.md,
# sections g and j, checked by building the official modules).
OFFICIAL_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.2.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 256, 1, 1),
    "encoder.down.4.block.0.nin_shortcut.weight": (512, 512, 1, 1),
    "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "encoder.norm_out.bias": (512,),
    "encoder.conv_out.weight": (256, 512, 1, 1),
    "encoder.conv_out.bias": (256,),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.conv_in.bias": (512,),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 256, 1, 1),
    "decoder.up.1.block.0.nin_shortcut.weight": (128, 128, 1, 1),
    "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.upsample.conv.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quantize.embedding.weight": (1024, 256),
}


def test_official_sizes_give_the_official_key_layout() -> None:
    with torch.device("meta"):
        tok = VQGANTokenizer(VQGANParams(random_init=True))
    state = tok.state_dict()
    assert len(state) == 168
    for key, shape in OFFICIAL_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # MaskGIT's tokenizer: bias-free conv_in and residual convs, no quant convs, no attention,
    # no encoder downsample parameters, a shortcut only where channels change.
    assert "encoder.conv_in.bias" not in state
    assert not any(k.endswith(("conv1.bias", "conv2.bias")) for k in state)
    assert not any("quant_conv" in k or ".attn" in k or "downsample" in k for k in state)
    assert sorted(k for k in state if "nin_shortcut" in k) == sorted(
        k for k in OFFICIAL_KEYS if "nin_shortcut" in k
    )
    assert (tok.vocab_size, tok.downsample, tok.grid((256, 256))) == (1024, 16, (16, 16))


def test_encode_is_the_l2_nearest_code_and_embed_decode_follow() -> None:
    tok = tiny()
    x = images()
    ids = tok.encode(x)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.int64
    z = tok.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(z.double(), tok.quantize.embedding.weight.double()).argmin(1)
    assert torch.equal(ids.reshape(-1), brute)
    assert len(ids.unique()) > 1
    codes = tok.embed(ids)
    assert codes.shape == (3, 8, 4, 4)
    assert torch.equal(codes[1, :, 2, 3], tok.quantize.embedding.weight[ids[1, 2, 3]])
    out = tok.decode(ids)
    assert out.shape == (3, 3, 16, 16)
    assert torch.allclose(out, tok.decoder(codes).clamp(0, 1))
    for bad in (ids.clone().fill_(32), ids.clone().fill_(-1)):  # e.g. MAGE's [MASK] id
        with pytest.raises(ValueError, match=r"ids must lie in \[0, 32\)"):
            tok.decode(bad)
    with pytest.raises(ValueError, match=r"must be \[B, h, w\]"):
        tok.embed(ids.flatten(1))
    with torch.no_grad():
        tok.decoder.conv_out.bias.fill_(50.0)
    assert torch.equal(tok.decode(ids), torch.ones_like(out))  # clamped, not squashed


@pytest.mark.parametrize("how", ["param", "keyword"])
def test_decode_without_clamp_returns_the_decoders_raw_values(how: str) -> None:
    # The official VQModel.decode does not clamp; clamp=false gives its values unchanged.
    tok = tiny(clamp=False) if how == "param" else tiny()
    ids = tok.encode(images())
    with torch.no_grad():
        tok.decoder.conv_out.bias.copy_(torch.tensor([-2.0, 0.5, 3.0]))
        raw = tok.decoder(tok.embed(ids))
    out = tok.decode(ids) if how == "param" else tok.decode(ids, clamp=False)
    assert torch.equal(out, raw)
    assert out.min() < -1.0 and out.max() > 2.0  # far outside [0, 1]: nothing was clamped
    clamped = tok.decode(ids, clamp=True)
    assert torch.equal(clamped, raw.clamp(0, 1)) and not torch.equal(clamped, raw)


def test_clamp_param_keeps_stored_config_hashes() -> None:
    from ocl_bench.api.params import build_params, hashed_dict

    default = build_params(VQGANTokenizer.Params, {}, "tokenizer")
    assert "clamp" not in hashed_dict(default)  # added in 0.2 at today's behaviour
    assert hashed_dict(build_params(VQGANTokenizer.Params, {"clamp": False}, "t"))["clamp"] is False


def test_resblock_shortcut_maps_the_branch_output_not_the_input() -> None:
    tok = tiny()
    block = tok.encoder.down[1].block[0]  # 8 -> 16 channels
    x = torch.randn(2, 8, 8, 8)

    def branch(t: torch.Tensor) -> torch.Tensor:
        h = block.conv1(F.silu(block.norm1(t)))
        return block.conv2(F.silu(block.norm2(h)))

    h = branch(x)
    assert torch.allclose(block(x), block.nin_shortcut(h) + h, atol=1e-6)
    same = tok.encoder.down[1].block[1]  # 16 -> 16: plain residual
    y = torch.randn(2, 16, 8, 8)
    assert same.nin_shortcut is None
    h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(y))))))
    assert torch.allclose(same(y), y + h, atol=1e-6)


def test_frozen_and_always_in_eval_mode() -> None:
    tok = tiny()
    assert not any(p.requires_grad for p in tok.parameters())
    owner = nn.Module()
    owner.tokenizer = tok
    owner.head = nn.Linear(2, 2)
    owner.train()
    assert owner.training and not tok.training
    assert not any(m.training for m in tok.modules())
    assert "tokenizer" in frozen_modules(owner)


def test_image_sides_must_divide_by_the_downsampling() -> None:
    with pytest.raises(ConfigError, match="divisible by 4"):
        tiny().encode(torch.rand(1, 3, 18, 16))


# --- checkpoints in the official layouts -----------------------------------------------------


def _write(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _load(path: Path | str, **extra: object) -> VQGANTokenizer:
    # Only norm_groups: every size must come from the file.
    values = {"checkpoint": str(path), "norm_groups": 4, **extra}
    return build_tokenizer("vqgan", values, "tokenizer")  # type: ignore[return-value]


def test_official_ckpt_and_mage_checkpoint_load_strictly_with_sizes_read(tmp_path: Path) -> None:
    src = tiny(seed=3)
    state = src.state_dict()
    x = images()
    want_ids, want_img = src.encode(x), src.decode(src.encode(x))
    official = _write(tmp_path / OFFICIAL_FILE, {"state_dict": state})
    mage_model = {f"vqgan.{k}": v for k, v in state.items()}
    mage_model["token_emb.word_embeddings.weight"] = torch.zeros(32 + 1000 + 1, 16)
    mage_model["blocks.0.norm1.weight"] = torch.ones(16)
    mage = _write(tmp_path / "mage-vitb.pth", {"model": mage_model, "epoch": 1599})
    bare = _write(tmp_path / "bare.pth", dict(state))
    for path in (official, mage, bare):
        tok = _load(path)
        assert (tok.params.ch, tok.params.ch_mult, tok.params.n_embed) == (8, (1, 2, 2), 32)
        assert tok.weights_source == str(path)
        assert torch.equal(tok.encode(x), want_ids)
        assert torch.equal(tok.decode(want_ids), want_img)
        assert not any(p.requires_grad for p in tok.parameters())


def test_checkpoint_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tiny(seed=4)
    path = _write(tmp_path / OFFICIAL_FILE, src.state_dict())
    monkeypatch.setenv(ENV_VAR, str(path))
    tok = build_tokenizer("vqgan", {"norm_groups": 4}, "tokenizer")
    assert torch.equal(tok.quantize.embedding.weight, src.quantize.embedding.weight)


def test_no_file_names_the_official_file_and_where_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(DataError) as err:
        build_tokenizer("vqgan", {}, "tokenizer")
    text = str(err.value)
    assert "\n" not in text
    assert OFFICIAL_FILE in text and "LTH14/mage" in text and ENV_VAR in text
    with pytest.raises(DataError, match="file not found"):
        build_tokenizer("vqgan", {"checkpoint": str(tmp_path / "nope.ckpt")}, "tokenizer")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.ckpt"))
    with pytest.raises(DataError, match=f"{ENV_VAR}=.*file not found"):
        build_tokenizer("vqgan", {}, "tokenizer")


def test_bad_files_fail_in_one_line(tmp_path: Path) -> None:
    state = tiny().state_dict()
    missing = dict(state)
    del missing["decoder.up.1.upsample.conv.bias"]
    extra = {**state, "quant_conv.weight": torch.zeros(8, 8, 1, 1)}
    shape = {**state, "decoder.conv_out.bias": torch.zeros(4)}
    spot = {"encoder.cls_token": torch.zeros(1, 1, 8), "slot_attn.slot_mu": torch.zeros(1, 1, 8)}
    cases = {
        "missing": (missing, r"missing keys \(1\): \[decoder\.up\.1\.upsample\.conv\.bias\]"),
        "unexpected": (extra, r"unexpected keys \(1\): \[quant_conv\.weight\].*taming"),
        "shape": (shape, r"shape mismatches \(1\): \[decoder\.conv_out\.bias"),
        "wrong": (spot, "not a MaskGIT/MAGE VQGAN checkpoint: no encoder.conv_in.weight"),
    }
    for name, (content, pattern) in cases.items():
        path = _write(tmp_path / f"{name}.ckpt", {"state_dict": content})
        with pytest.raises(DataError, match=pattern) as err:
            _load(path)
        assert "\n" not in str(err.value)
    path = _write(tmp_path / "ok.ckpt", state)
    with pytest.raises(DataError, match="vocabulary mismatch: tokenizer.n_embed=512 .* has 32"):
        _load(path, n_embed=512)
    assert _load(path, n_embed=32).vocab_size == 32  # agreeing with the file is fine
    with pytest.raises(ConfigError, match="exclude each other"):
        _load(path, random_init=True)


# --- cached ids --------------------------------------------------------------------------------


def test_ids_are_cached_per_image_and_keyed_by_the_weights(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    tok = tiny(seed=5)
    calls: list[int] = []
    tok.encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    x = images(4)
    first = tok.encode_cached(x[:2], cache)
    assert calls == [2]
    both = tok.encode_cached(x, cache)  # two hits, two misses: only the misses run
    assert calls == [2, 2]
    again = tok.encode_cached(x, cache)
    assert calls == [2, 2]
    assert torch.equal(both, tok.encode(x)) and torch.equal(again, both)
    assert torch.equal(first, both[:2]) and again.dtype == torch.int64
    key = tok.cache_key(cache, x)
    stored_ids = cache.get(key, sample_ids(x))
    assert stored_ids is not None and stored_ids.dtype == torch.int16  # 2 bytes a token
    assert torch.equal(stored_ids.long(), both)
    other = tiny(seed=6)
    assert other.cache_key(cache, x) != key  # other weights never read these ids
    assert tok.encode_cached(x, None).equal(both)
