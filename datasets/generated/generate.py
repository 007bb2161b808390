"""Building a generated dataset: prompt -> Stable Diffusion image + pseudo mask + metadata.

What `ocl-bench generate-dataset` and the `generated` dataset plugin run (the plugin builds
its folder the first time it is read). For every sample i of a real dataset's split:

1. a prompt from the caption source (datasets/generated/captions.py);
2. an image from a diffusers `StableDiffusionPipeline` (DPM-Solver multistep) with the
   seed `seed + i`, while :func:`~ocl_bench.datasets.generated.pseudo_masks.recording` collects the
   UNet's attention, the cross-attention against the class words alone (a class prompt);
3. a pseudo mask from that attention (datasets/generated/pseudo_masks.py).

Folder layout (one file each per item, `NNNNNN` = the item index):

    recipe.json          the recipe; a folder is only ever extended with the same one
    images/NNNNNN.png    RGB
    masks/NNNNNN.png     8-bit labels: 0 background, k = class k of the item, 255 ignore
    meta/NNNNNN.json     prompt, classes, token spans, seed, model, thresholds, steps

Each file is written to a temporary name and renamed; the metadata goes last, so an item
counts as finished exactly when its meta file exists, and a build killed at any moment
resumes where it stopped without losing or rewriting finished items.

Stable Diffusion comes from a local diffusers folder only: `pretrained`, $OCL_BENCH_SD, or
the Hugging Face cache of `model_id` read offline (the rules of the latent_diffusion
decoder); `tiny` builds random stand-ins (UNet, VAE, CLIP text encoder and a character-level
CLIP tokenizer) that run on a CPU in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ocl_bench.api.diffusion import tiny_unet_and_vae
from ocl_bench.api.errors import DataError
from ocl_bench.datasets.generated.captions import Prompt, PromptSource
from ocl_bench.datasets.generated.pseudo_masks import (
    AttentionRecorder,
    RefineSettings,
    class_prompt,
    class_scores,
    label_map,
    recording,
)

SD_ENV = "OCL_BENCH_SD"
SD_MODEL_ID = "stabilityai/stable-diffusion-2-1"
FORMAT = 1


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a generated dataset's content (hashed into its cache key)."""

    source: str = "shapes"  # dataset plugin whose samples give the prompts
    source_params: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    captions: Literal["dataset", "class_names", "blip2"] = "dataset"
    count: int = 0  # 0: one generated image per source sample
    image_size: int = 0  # 0: the UNet's native size (tiny: the source's image size)
    pretrained: str = ""
    model_id: str = SD_MODEL_ID
    tiny: bool = False
    tiny_width: int = 32
    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    max_side: int = 64
    refine: RefineSettings = field(default_factory=RefineSettings)
    blip2: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = FORMAT
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def find_stable_diffusion(pretrained: str, model_id: str) -> Path:
    """The local diffusers folder of Stable Diffusion, or a one-line DataError."""
    for where, value in (("--pretrained", pretrained), (f"${SD_ENV}", os.environ.get(SD_ENV))):
        if value:
            folder = Path(value).expanduser()
            for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
                if not (folder / part).is_dir():
                    raise DataError(
                        f"{where}={folder} is not a Stable Diffusion folder with text encoder "
                        f"(missing {part}/)"
                    )
            return folder
    try:
        from huggingface_hub import snapshot_download

        from ocl_bench.api.weights import hf_hub_cache_dir

        path = Path(
            snapshot_download(model_id, local_files_only=True, cache_dir=str(hf_hub_cache_dir()))
        )
        if (path / "unet").is_dir():
            return path
    except Exception:  # not cached, or the hub library is missing
        pass
    raise DataError(
        f"no Stable Diffusion found: pass --pretrained PATH (a diffusers folder with unet/, vae/,"
        f" text_encoder/, tokenizer/, scheduler/), set ${SD_ENV}=PATH, or put {model_id} in the "
        "Hugging Face cache; --tiny runs with random stand-ins"
    )


# tiny stand-ins ---------------------------------------------------------------------------

TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,;.'-"


def tiny_tokenizer(folder: Path) -> Any:
    """A CLIPTokenizer over single characters (every word is several BPE tokens, which is
    what the multi-token class spans need to be exercised), files written to `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in TINY_CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def tiny_pipeline(width: int, image_size: int, tokenizer_dir: Path, seed: int = 0) -> Any:
    """A random StableDiffusionPipeline small enough for a CPU: 2-level UNet, VAE with
    scale factor 2, 2-layer CLIP text encoder, DPM-Solver multistep with SD 2.1's schedule."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % 4:
        raise DataError(f"tiny generation needs an image size divisible by 4, got {image_size}")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet, vae = tiny_unet_and_vae(width, image_size // 2, image_size)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(recipe: Recipe, work_dir: Path) -> tuple[Any, str]:
    """(pipeline, a description of the model for the metadata)."""
    if recipe.tiny:
        size = recipe.image_size
        return tiny_pipeline(recipe.tiny_width, size, work_dir / "tiny_tokenizer"), (
            f"tiny-random(width={recipe.tiny_width})"
        )
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    folder = find_stable_diffusion(recipe.pretrained, recipe.model_id)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if torch.cuda.is_available():  # Dataset Diffusion generates in fp16 on a GPU
        pipe.to("cuda", torch.float16)
    return pipe, str(folder)


# writing ----------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def item_name(index: int) -> str:
    return f"{index:06d}"


def finished(root: Path, index: int) -> bool:
    return (root / "meta" / f"{item_name(index)}.json").is_file()


def check_recipe(root: Path, recipe: Recipe) -> None:
    """Write the recipe into a new folder; a folder made with another recipe is an error."""
    path = root / "recipe.json"
    wanted = recipe.to_json()
    if path.is_file():
        found = json.loads(path.read_text())
        if found != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise DataError(
                f"{root} was generated with another recipe (differs in: {', '.join(changed)}); "
                "choose a new folder"
            )
        return
    _atomic(path, lambda p: p.write_text(json.dumps(wanted, indent=1, sort_keys=True)))


def source_dataset(recipe: Recipe, split: str | None = None) -> Any:
    """The real dataset plugin the prompts (and the evaluation images) come from."""
    from ocl_bench.api.params import build_params
    from ocl_bench.run.registry import registry

    cls = registry().get("dataset", recipe.source)
    params = build_params(cls.Params, dict(recipe.source_params), "dataset.source_params")
    return cls(params, split or recipe.split)


@torch.no_grad()
def generate_item(
    pipe: Any, prompt: Prompt, seed: int, recipe: Recipe, image_size: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(RGB uint8 [H,W,3], labels uint8 [H,W], class token spans) of one prompt."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent = (image_size // scale, image_size // scale)
    device = pipe.unet.device
    ids, spans = class_prompt(pipe.tokenizer, prompt.classes, pipe.tokenizer.model_max_length)
    class_embeds = pipe.text_encoder(ids[None].to(device))[0]
    recorder = AttentionRecorder(
        latent_size=latent, batch_size=1, max_side=recipe.max_side, class_embeds=class_embeds
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    with recording(pipe.unet, recorder):
        out = pipe(
            prompt=[prompt.text],
            negative_prompt=[recipe.negative_prompt] if recipe.guidance_scale > 1 else None,
            height=image_size,
            width=image_size,
            num_inference_steps=recipe.steps,
            guidance_scale=recipe.guidance_scale,
            generator=generator,
            output_type="pt",
            callback_on_step_end=recorder.on_step_end,
        )
    image = out.images[0].float().clamp(0, 1)
    rgb = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    if spans:
        scores = class_scores(recorder.average(), spans, latent, recipe.refine)
        labels = label_map(scores, (image_size, image_size), recipe.refine).numpy()
    else:  # no class word: nothing to segment, all background
        labels = np.zeros((image_size, image_size), np.uint8)
    return rgb, labels, spans


def build(root: Path, recipe: Recipe, *, progress: bool = True) -> int:
    """Generate every missing item of `recipe` into `root`; returns how many were made."""
    root = Path(root).expanduser()
    source = source_dataset(recipe)
    count = recipe.count or len(source)
    if count > len(source):
        raise DataError(
            f"count={count} but the {recipe.source} {recipe.split} split has {len(source)} images"
        )
    image_size = recipe.image_size or (int(source.image_size[0]) if recipe.tiny else 0)
    if recipe.tiny and image_size == 0:
        raise DataError("tiny generation needs an image size")
    recipe = _with_size(recipe, image_size)
    root.mkdir(parents=True, exist_ok=True)
    check_recipe(root, recipe)
    todo = [i for i in range(count) if not finished(root, i)]
    if not todo:
        return 0
    # Generation must not move the global RNG: a run that builds its dataset first would
    # otherwise initialise its model differently from one that finds the dataset built.
    with torch.random.fork_rng(devices=[]):
        return _generate(root, recipe, source, todo, count, progress)


def _generate(
    root: Path, recipe: Recipe, source: Any, todo: list[int], count: int, progress: bool
) -> int:
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() and not recipe.tiny else "cpu"
    prompts = PromptSource(recipe.captions, source, blip2=recipe.blip2, device=device)
    pipe, model = load_pipeline(recipe, root)
    pipe.set_progress_bar_config(disable=True)
    size = recipe.image_size or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    bar = tqdm(
        total=count,
        initial=count - len(todo),
        desc=f"generating {root.name}",
        disable=not progress,
        unit="img",
    )
    for index in todo:
        prompt = prompts(index)
        seed = recipe.seed + index
        rgb, labels, spans = generate_item(pipe, prompt, seed, recipe, size)
        meta = {
            "index": index,
            "source_index": index,
            "prompt": prompt.text,
            "caption": prompt.caption,
            "classes": list(prompt.classes),
            "token_spans": [list(s) for s in spans],
            "seed": seed,
            "model": model,
            "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "steps": recipe.steps,
            "guidance_scale": recipe.guidance_scale,
            "thresholds": {
                "power": recipe.refine.power,
                "fg": recipe.refine.fg_threshold,
                "ignore": recipe.refine.ignore_threshold,
            },
            "aggregate": recipe.refine.aggregate,
            "image_size": size,
        }
        write_item(root, index, rgb, labels, meta)
        bar.update(1)
    bar.close()
    return len(todo)


def write_item(root: Path, index: int, rgb: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Image, mask, then metadata, each atomically: the meta file marks a finished item."""
    name = item_name(index)
    _atomic(root / "images" / f"{name}.png", lambda p: Image.fromarray(rgb).save(p, "PNG"))
    _atomic(root / "masks" / f"{name}.png", lambda p: Image.fromarray(labels).save(p, "PNG"))
    _atomic(root / "meta" / f"{name}.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


def preview(root: Path, count: int = 8) -> Path | None:
    """root/preview.png: the first `count` finished items, image over pseudo mask (classes in
    colour, background black, ignore white), to eyeball the masks before training."""
    from ocl_bench.api.drawing import image_rows_figure, palette

    done = [i for i in range(count) if finished(root, i)]
    if not done:
        return None
    images, masks = [], []
    for i in done:
        name = item_name(i)
        rgb = np.asarray(Image.open(root / "images" / f"{name}.png").convert("RGB"), np.float32)
        labels = np.asarray(Image.open(root / "masks" / f"{name}.png"), dtype=np.int64)
        colours = np.concatenate([np.zeros((1, 3)), palette(255)[1:], np.ones((1, 3))])
        images.append(torch.from_numpy(rgb / 255.0).permute(2, 0, 1))
        masks.append(torch.from_numpy(colours[labels].astype(np.float32)).permute(2, 0, 1))
    rows = {"generated": torch.stack(images), "pseudo mask": torch.stack(masks)}
    return image_rows_figure(rows, root / "preview.png")


def _with_size(recipe: Recipe, size: int) -> Recipe:
    from dataclasses import replace

    return replace(recipe, image_size=size)


__all__ = [
    "Recipe",
    "build",
    "check_recipe",
    "find_stable_diffusion",
    "finished",
    "generate_item",
    "load_pipeline",
    "preview",
    "source_dataset",
    "tiny_pipeline",
    "tiny_tokenizer",
]
