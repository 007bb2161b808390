"""ocl-bench's pseudo masks against Dataset Diffusion's code, when present.

GLASS makes its training masks with Dataset Diffusion (github.com/VinAIResearch/Dataset-Diffusion,
Nguyen et al. 2023; GLASS's README points there). Opt-in: point OCL_BENCH_DATASET_DIFFUSION_REPO
at a checkout. Nothing of it is copied here:

- `src/attn_processor.py` and `src/pipeline_class_prompts.py` are imported as they are (they
  run under diffusers 0.42 unchanged, with deprecation warnings only). Their recorder is
  driven as `gen_data.py` drives it: `register_attention_control` on every layer, which
  counts layer calls to advance its step, and the class-prompt pipeline, whose encoder batch
  is [negative, caption, class prompt] (3B). ocl-bench's recorder runs on an identical copy
  of the same tiny random pipeline (`tiny_pipeline`, a UNet with attention at 16x16 and
  8x8) with the same prompts and seed: the images and the averaged self- and
  cross-attention maps at every resolution agree.
- The refinement (self-attention power, class maps, thresholds, the 255 band) lives inline in
  `gen_data.py`'s `main`, a script. Its statements are cut out of the script's syntax tree with
  `ast` at test time (from `w, h = image.size` to just before the mask is written) and
  executed on the same attention: on the maps both recorders recorded and on planted maps,
  its label maps equal `class_scores` + `label_map` (aggregate='single', self-attention at
  the latent size, cross-attention at half of it, as Dataset Diffusion's 32/16 at 512 px).

Dataset Diffusion's class-token indices count words (`nltk.word_tokenize`), not BPE tokens, a
known pitfall ocl-bench fixes with real token spans; the tests hand its refinement the token
positions of ocl-bench's spans, so both refine the same tokens.

    git clone https://github.com/VinAIResearch/Dataset-Diffusion /tmp/dd
    OCL_BENCH_DATASET_DIFFUSION_REPO=/tmp/dd \
        python -m pytest tests/test_official_dataset_diffusion.py
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ocl_bench.datasets.generated.captions import Prompt  # noqa: E402
from ocl_bench.datasets.generated.generate import Recipe, generate_item, tiny_pipeline  # noqa: E402
from ocl_bench.datasets.generated.pseudo_masks import (  # noqa: E402
    IGNORE,
    AttentionRecorder,
    RefineSettings,
    class_prompt,
    class_scores,
    label_map,
    recording,
)
from tests.official_checkout import checkout_on_path  # noqa: E402

REPO = os.environ.get("OCL_BENCH_DATASET_DIFFUSION_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "src" / "attn_processor.py").is_file(),
    reason="set OCL_BENCH_DATASET_DIFFUSION_REPO to a checkout of "
    "github.com/VinAIResearch/Dataset-Diffusion",
)
IMAGE, LATENT, STEPS, SEED = 32, 16, 4, 3
SELF_RES, CROSS_RES = 16, 8  # latent / 1 and latent / 2 (Dataset Diffusion: 64/2 and 64/4)
SETTINGS = RefineSettings(aggregate="single", self_downsample=1, cross_downsample=2)
PROMPT = Prompt("a red square beside a blue circle", ("square", "circle"))
NEGATIVE = "ugly, tiling, blurry"


@pytest.fixture(scope="module")
def official() -> types.SimpleNamespace:
    with checkout_on_path(REPO):
        from src import attn_processor, pipeline_class_prompts
    return types.SimpleNamespace(
        store=attn_processor.AttentionStoreClassPrompts,
        processor=attn_processor.StoredAttnClassPromptsProcessor,
        register=attn_processor.register_attention_control,
        aggregate=attn_processor.aggregate_attention,
        pipeline=pipeline_class_prompts.StableDiffusionClassPromptsPipeline,
        refine=_refinement(Path(REPO) / "gen_data.py"),
    )


def _refinement(script: Path) -> types.CodeType | str:
    """gen_data.py's refinement statements, compiled from the script's syntax tree: in `main`,
    the loop over a batch's images (`for j in ...`) from `w, h = image.size` to the statement
    before the mask is written to disk (`save_name = ...`). They read `image`, `controller`,
    `self_res`, `cross_res`, `batch_indices`, `batch_labels`, `j` and `args`, and leave the
    label map in `mask`. A str says why the statements could not be found."""
    tree = ast.parse(script.read_text(), str(script))
    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    loop = main and next(
        (
            n
            for n in ast.walk(main)
            if isinstance(n, ast.For) and isinstance(n.target, ast.Name) and n.target.id == "j"
        ),
        None,
    )
    if loop is None:
        return f"{script}: no `for j in ...` loop in main() to take the refinement from"
    src = [ast.unparse(s) for s in loop.body]
    start = next((i for i, s in enumerate(src) if s.startswith("w, h = image.size")), None)
    branch = next(
        (s for s in loop.body if isinstance(s, ast.If) and "batch_indices" in ast.unparse(s.test)),
        None,
    )
    if start is None or branch is None:
        return f"{script}: the refinement no longer starts at `w, h = image.size`"
    inner = list(branch.body)
    stop = next((i for i, s in enumerate(inner) if "save_name" in ast.unparse(s)), None)
    if stop is None:
        return f"{script}: the refinement no longer ends where the mask is saved"
    head = loop.body[start : loop.body.index(branch)]
    cut = ast.If(test=branch.test, body=inner[:stop], orelse=[])
    module = ast.fix_missing_locations(ast.Module(body=[*head, cut], type_ignores=[]))
    return compile(module, f"{script}:refinement", "exec")


def _official_labels(official, controller, spans: list[tuple[int, int]]) -> np.ndarray:
    """Run gen_data.py's refinement for one image (j = 0) on what `controller` holds."""
    if isinstance(official.refine, str):
        pytest.skip(official.refine)
    scope = {
        "F": F,
        "np": np,
        "torch": torch,
        "aggregate_attention": official.aggregate,
        "image": Image.new("RGB", (IMAGE, IMAGE)),
        "controller": controller,
        "self_res": SELF_RES,
        "cross_res": CROSS_RES,
        # token positions after the BOS (the script adds 1), as lists: a span is averaged
        "batch_indices": [[list(range(a - 1, b - 1)) for a, b in spans]],
        "batch_labels": [list(range(len(spans) + 1))],  # label = class index + 1, as ours
        "j": 0,
        "args": argparse.Namespace(threshold=0.6, uncertainty_threshold=0.5),
    }
    exec(official.refine, scope)
    return scope["mask"]


def _as_our_maps(official, controller) -> dict:
    """The official averaged maps in ocl-bench's layout {(kind, rows, cols): [B, N, Nk]}."""
    maps = {}
    for kind, cross in (("self", False), ("cross", True)):
        for res in (SELF_RES, CROSS_RES):
            avg = official.aggregate(controller, res=res, is_cross=cross)  # [B, r, r, Nk]
            maps[(kind, res, res)] = avg.reshape(avg.shape[0], res * res, avg.shape[-1])
    return maps


@pytest.fixture(scope="module")
def runs(official, tmp_path_factory) -> types.SimpleNamespace:
    """One generation by each recorder on identical tiny pipelines, same prompts and seed."""
    ours = tiny_pipeline(32, IMAGE, tmp_path_factory.mktemp("tok"), seed=0)
    ids, spans = class_prompt(ours.tokenizer, PROMPT.classes)
    joined = " ".join(PROMPT.classes)  # gen_data.py's class prompt: the class words
    assert ours.tokenizer(joined, padding="max_length").input_ids == ids.tolist()

    with warnings.catch_warnings():  # deprecated diffusers calls (in_channels, decode_latents)
        warnings.simplefilter("ignore")
        theirs = official.pipeline(
            vae=ours.vae,
            text_encoder=ours.text_encoder,
            tokenizer=ours.tokenizer,
            unet=copy.deepcopy(ours.unet),
            scheduler=type(ours.scheduler).from_config(ours.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        theirs.set_progress_bar_config(disable=True)
        controller = official.store(start=0, end=100)  # gen_data.py's window
        official.register(theirs, controller, official.processor)
        out = theirs(
            [PROMPT.text],
            class_prompts=[joined],
            negative_prompt=[NEGATIVE],
            num_inference_steps=STEPS,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="numpy",
            height=IMAGE,
            width=IMAGE,
        )

    ours.set_progress_bar_config(disable=True)
    with torch.no_grad():
        class_embeds = ours.text_encoder(ids[None])[0]
        recorder = AttentionRecorder((LATENT, LATENT), batch_size=1, class_embeds=class_embeds)
        with recording(ours.unet, recorder):
            image = ours(
                prompt=[PROMPT.text],
                negative_prompt=[NEGATIVE],
                height=IMAGE,
                width=IMAGE,
                num_inference_steps=STEPS,
                guidance_scale=7.5,  # Dataset Diffusion's pipeline default
                generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="np",
                callback_on_step_end=recorder.on_step_end,
            ).images
    recipe = Recipe(
        tiny=True, steps=STEPS, guidance_scale=7.5, negative_prompt=NEGATIVE, refine=SETTINGS
    )
    rgb, labels, item_spans = generate_item(ours, PROMPT, SEED, recipe, IMAGE)
    return types.SimpleNamespace(
        controller=controller,
        official_image=out.images,
        recorder=recorder,
        image=image,
        spans=spans,
        item=(rgb, labels, item_spans),
        unet=ours.unet,
    )


def test_recorded_maps_equal_the_official_processor(official, runs) -> None:
    assert runs.controller.cur_step == STEPS  # its layer counting advanced once per step
    np.testing.assert_allclose(runs.image, runs.official_image, atol=1e-5)
    theirs = _as_our_maps(official, runs.controller)
    ours = runs.recorder.average()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6, msg=str(key))
    layers = {}
    for name in runs.unet.attn_processors:
        place = "self" if name.endswith("attn1.processor") else "cross"
        side = LATENT if not name.startswith("mid_block") else LATENT // 2
        layers[(place, side, side)] = layers.get((place, side, side), 0) + 1
    assert runs.recorder.counts == {k: STEPS * n for k, n in layers.items()}
    assert not any(  # ours restored the UNet's processors
        type(p).__name__ == "RecordingAttnProcessor" for p in runs.unet.attn_processors.values()
    )


def _local_self_attention() -> torch.Tensor:
    """float[N,N] at SELF_RES: each pixel attends to its neighbours (a Gaussian of the
    distance), rows summing to one, as a trained UNet's self-attention does."""
    n = SELF_RES
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2).float()
    affinity = torch.exp(-(torch.cdist(pos, pos) ** 2) / 6)
    return affinity / affinity.sum(1, keepdim=True)


def test_pseudo_masks_from_recorded_cross_attention_equal_the_official(official, runs) -> None:
    """The refinement on what both recorders recorded: each recorder's own cross-attention
    (class-prompt keys, 8x8, multi-token spans) with a local self-attention in place of the
    random UNet's, which is uniform (1/N to 1e-4): its 4th power is rank one to 2e-5 of its
    mean, and min-max normalised class maps of it are float32 rounding noise."""
    local = _local_self_attention()
    controller = copy.copy(runs.controller)
    controller.attention_store = {
        key: [
            local.reshape(1, 1, SELF_RES, SELF_RES, -1).expand_as(item) * runs.controller.cur_step
            if key.endswith("self") and item.shape[2] == SELF_RES
            else item
            for item in items
        ]
        for key, items in runs.controller.attention_store.items()
    }
    expected = _official_labels(official, controller, runs.spans)
    maps = {**runs.recorder.average(), ("self", SELF_RES, SELF_RES): local[None]}
    scores = class_scores(maps, runs.spans, (LATENT, LATENT), SETTINGS)
    labels = label_map(scores, (IMAGE, IMAGE), SETTINGS).numpy()
    np.testing.assert_array_equal(labels, expected)
    assert {0, 1, 2, IGNORE} <= set(np.unique(expected).tolist())
    # the dataset builder's own path (generate_item) made the same image from the prompt
    rgb, _, item_spans = runs.item
    assert item_spans == runs.spans
    official_rgb = (runs.official_image[0] * 255).round().astype(np.uint8)
    assert np.abs(rgb.astype(int) - official_rgb.astype(int)).max() <= 1


def _planted(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """(self [N,N], cross at CROSS_RES [n,77], spans): class 1 (tokens 1-2) lives in the
    top-left block, class 2 (tokens 3-5) in the bottom-right one; the self-attention mixes
    pixels with their neighbours so the class maps fade at the borders (the 255 band)."""
    g = torch.Generator().manual_seed(seed)
    n = SELF_RES
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2).float()
    affinity = torch.exp(-(torch.cdist(pos, pos) ** 2) / 6) + 0.05 * torch.rand(
        n * n, n * n, generator=g
    )
    self_attn = affinity / affinity.sum(1, keepdim=True)
    c = CROSS_RES
    logits = torch.randn(c, c, 77, generator=g) * 0.3
    logits[: c // 2, : c // 2, 1:3] += 3.0
    logits[c // 2 + 1 :, c // 2 :, 3:6] += 3.0
    cross = logits.reshape(c * c, 77).softmax(-1)
    return self_attn, cross, [(1, 3), (3, 6)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_attention_gives_the_official_labels(official, seed) -> None:
    self_attn, cross, spans = _planted(seed)
    heads, steps = 2, 3
    controller = official.store(start=0, end=100)
    # what the official store holds after `steps` steps: per layer, the sum over steps of
    # [B, heads, r, r, Nk] maps (here every step and head saw the planted map)
    stored = {k: [] for k in controller.get_empty_store()}
    stored["up_self"] = [
        self_attn.reshape(1, 1, SELF_RES, SELF_RES, -1).repeat(1, heads, 1, 1, 1) * steps
    ]
    stored["mid_cross"] = [
        cross.reshape(1, 1, CROSS_RES, CROSS_RES, -1).repeat(1, heads, 1, 1, 1) * steps
    ]
    controller.attention_store, controller.cur_step = stored, steps
    expected = _official_labels(official, controller, spans)

    maps = {
        ("self", SELF_RES, SELF_RES): self_attn[None],
        ("cross", CROSS_RES, CROSS_RES): cross[None],
    }
    labels = label_map(
        class_scores(maps, spans, (LATENT, LATENT), SETTINGS), (IMAGE, IMAGE), SETTINGS
    )
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert {0, 1, 2, IGNORE} <= set(np.unique(expected).tolist())
    assert expected[2, 2] == 1 and expected[-3, -3] == 2  # the planted regions
