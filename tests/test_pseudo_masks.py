"""Attention recording on a tiny diffusers UNet and pseudo masks from planted attention."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ocl_bench.datasets.generated.generate import tiny_tokenizer  # noqa: E402
from ocl_bench.datasets.generated.pseudo_masks import (  # noqa: E402
    IGNORE,
    AttentionRecorder,
    RecordingAttnProcessor,
    RefineSettings,
    class_prompt,
    class_scores,
    label_map,
    recording,
)


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def _inputs(batch: int, tokens: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, tokens, 32, generator=g)
    return x, ctx


@torch.no_grad()
def test_recorder_keeps_outputs_counts_layers_and_rows_sum_to_one(unet):
    x, ctx = _inputs(2)
    reference = unet(x, 10, encoder_hidden_states=ctx).sample
    recorder = AttentionRecorder(latent_size=(16, 16), batch_size=2)
    steps = 3
    with recording(unet, recorder):
        for step in range(steps):
            out = unet(x, 10, encoder_hidden_states=ctx).sample
            recorder.on_step_end(None, step, 10, {})
    assert torch.equal(out, reference)
    layers = {"self": 0, "cross": 0}
    for name in unet.attn_processors:
        layers["self" if ".attn1." in name else "cross"] += 1
    for kind in ("self", "cross"):
        recorded = sum(c for k, c in recorder.counts.items() if k[0] == kind)
        assert recorded == steps * layers[kind]
    maps = recorder.average()
    assert {k[1] for k in maps} == {16, 8}  # from the 16x16 latent, no 512-px assumption
    cross = maps[("cross", 16, 16)]
    assert cross.shape == (2, 256, 7)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 256))


@torch.no_grad()
def test_recorder_keeps_the_conditional_half_and_caps_resolution(unet):
    x, ctx = _inputs(1)
    uncond = torch.zeros_like(ctx)
    alone = AttentionRecorder(latent_size=(16, 16), batch_size=1)
    with recording(unet, alone):
        unet(x, 10, encoder_hidden_states=ctx)
    both = AttentionRecorder(latent_size=(16, 16), batch_size=1, max_side=8)
    with recording(unet, both):
        unet(torch.cat([x, x]), 10, encoder_hidden_states=torch.cat([uncond, ctx]))
    assert ("cross", 16, 16) not in both.sums and both.skipped[("cross", 16, 16)] > 0
    torch.testing.assert_close(both.average()[("cross", 8, 8)], alone.average()[("cross", 8, 8)])


@torch.no_grad()
def test_step_window_and_class_embeddings(unet):
    x, ctx = _inputs(1)
    recorder = AttentionRecorder(latent_size=(16, 16), batch_size=1, start=1, stop=2)
    recorder.class_embeds = torch.randn(1, 5, 32)
    with recording(unet, recorder):
        for step in range(3):
            unet(x, 10, encoder_hidden_states=ctx)
            recorder.on_step_end(None, step, 10, {})
    assert recorder.counts[("cross", 8, 8)] == 1  # one step of the window, one mid layer
    assert recorder.average()[("cross", 16, 16)].shape[-1] == 5  # keys of the class prompt


def test_processors_are_restored_after_an_exception(unet):
    before = unet.attn_processors
    x, ctx = _inputs(1)
    with pytest.raises(RuntimeError, match="boom"):
        with recording(unet, AttentionRecorder(latent_size=(16, 16), batch_size=1)):
            assert all(isinstance(p, RecordingAttnProcessor) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_class_prompt_spans_come_from_the_tokenizer(tmp_path):
    tok = tiny_tokenizer(tmp_path)  # one token per character
    ids, spans = class_prompt(tok, ["cat", "traffic light"], 77)
    assert spans == [(1, 4), (4, 16)]  # "traffic light" = 12 characters, two words
    assert ids[0] == tok.bos_token_id and ids[16] == tok.eos_token_id and ids.shape == (77,)
    assert tok.convert_ids_to_tokens(ids[1:4].tolist()) == ["c", "a", "t</w>"]


def _planted(side: int = 8):
    """One image: class 0 attends to the top-left quadrant, class 1 (two tokens) to the
    bottom-right one; self-attention averages within each quadrant."""
    n = side * side
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    quadrant = ((yy >= side // 2) * 2 + (xx >= side // 2)).flatten()
    same = (quadrant[:, None] == quadrant[None, :]).float()
    self_attn = same / same.sum(1, keepdim=True)
    cross = torch.full((n, 5), 0.1)
    cross[quadrant == 0, 1] = 1.0  # token 1: class 0
    cross[quadrant == 3, 2] = 0.9  # tokens 2-3: class 1, averaged
    cross[quadrant == 3, 3] = 0.7
    cross = cross / cross.sum(1, keepdim=True)
    return self_attn, cross, quadrant.view(side, side)


def test_planted_attention_recovers_the_planted_regions():
    self_attn, cross, quadrant = _planted()
    low = torch.nn.functional.avg_pool2d(cross.T.reshape(1, 5, 8, 8), 2)[0].flatten(1).T
    maps = {("self", 8, 8): self_attn, ("cross", 8, 8): cross, ("cross", 4, 4): low}
    settings = RefineSettings(self_downsample=2, cross_downsample=4, aggregate="single")
    scores = class_scores(maps, [(1, 2), (2, 4)], (16, 16), settings)
    assert scores.shape == (2, 8, 8)
    labels = label_map(scores, (8, 8), settings)
    expected = torch.zeros(8, 8, dtype=torch.uint8)
    expected[quadrant == 0] = 1
    expected[quadrant == 3] = 2
    assert torch.equal(labels, expected)
    mean = class_scores(maps, [(1, 2), (2, 4)], (16, 16), RefineSettings(aggregate="mean"))
    assert torch.equal(label_map(mean, (8, 8), settings), expected)


def test_thresholds_split_foreground_ignore_and_background():
    settings = RefineSettings()  # fg 0.6, ignore band [0.5, 0.6)
    assert (settings.power, settings.fg_threshold, settings.ignore_threshold) == (4, 0.6, 0.5)
    scores = torch.tensor([[[0.65, 0.55, 0.3]], [[0.1, 0.2, 0.45]]])  # [C=2, 1, 3]
    labels = label_map(scores, (1, 3), settings)
    # same size: the bicubic resize is the identity, so the thresholds alone decide
    assert labels.tolist() == [[1, IGNORE, 0]]
    with pytest.raises(ValueError, match="thresholds"):
        RefineSettings(fg_threshold=0.4, ignore_threshold=0.5)


def test_missing_resolution_names_what_was_recorded():
    self_attn, cross, _ = _planted()
    maps = {("self", 8, 8): self_attn, ("cross", 8, 8): cross}
    # a 768-px SD 2.1 latent (96) has no 32x32 maps: the error says what there is
    with pytest.raises(ValueError, match=r"no self-attention recorded at 48x48 \(recorded: 8x8\)"):
        class_scores(maps, [(1, 2)], (96, 96), RefineSettings())
    single = RefineSettings(aggregate="single", self_downsample=8, cross_downsample=4)
    with pytest.raises(ValueError, match=r"no cross-attention recorded at 16x16"):
        class_scores(maps, [(1, 2)], (64, 64), single)
