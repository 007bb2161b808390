"""The `stablelsd` protocol's model input against latent-slot-diffusion's own loader.

Opt-in: point OCL_BENCH_LSD_REPO at a checkout of github.com/JindongJiang/latent-slot-diffusion
(the same variable as tests/test_official_stablelsd.py). Its `src/data/dataset.py` GlobDataset
is built as train_lsd.py builds it for COCO (img_size 256 for the VAE, vit_norm with
vit_input_resolution 448, no flip) and run on the images of the small COCO of
tests/official_protocol_data.py (odd sizes whose long sides truncate and round differently,
odd crop offsets). Our coco dataset at image_size 448, with the dataset settings of
protocols/stablelsd.toml, must give the DINOv2 input (`pixel_values_vit`) to 1e-6 after
ImageNet Normalize. The VAE input (`pixel_values`, the picture resized to 256 by PIL) is not a
dataset output here: the latent_diffusion decoder resizes the 448 crop; the test bounds that
residual (stated in the protocol file). LSD releases no COCO ground truth: the protocol's
annotation rules are GLASS's (tests/test_official_glass*.py).

    git --git-dir=/work/.mirror/JindongJiang+latent-slot-diffusion/repo archive HEAD src \\
        | tar -x -C /tmp/lsd
    OCL_BENCH_LSD_REPO=/tmp/lsd python -m pytest tests/test_official_stablelsd_protocol.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from ocl_bench.api.contracts import Dims
from ocl_bench.datasets.coco import CocoDataset, CocoParams
from ocl_bench.decoders.latent_diffusion import LatentDiffusionDecoder, LatentDiffusionParams
from tests.official_checkout import checkout_on_path
from tests.official_protocol_data import MEAN, STD, write_coco

REPO = os.environ.get("OCL_BENCH_LSD_REPO", "")
pytestmark = pytest.mark.skipif(
    not REPO or not (Path(REPO) / "src" / "data" / "dataset.py").is_file(),
    reason="set OCL_BENCH_LSD_REPO to a checkout of github.com/JindongJiang/latent-slot-diffusion",
)
PROTOCOL = Path(__file__).resolve().parents[1] / "protocols" / "stablelsd.toml"
VIT, VAE = 448, 256  # parser.py --vit_input_resolution 448; configs/coco/train.sh --resolution 256


@pytest.fixture(scope="module")
def glob_dataset() -> type:
    pytest.importorskip("torchvision")
    with checkout_on_path(REPO):
        from src.data.dataset import GlobDataset
    return GlobDataset


def settings() -> dict[str, Any]:
    with open(PROTOCOL, "rb") as f:
        return tomllib.load(f)["coco"]["dataset"]


def test_dinov2_and_vae_inputs_match_lsd_globdataset(glob_dataset, tmp_path) -> None:
    root = write_coco(tmp_path)
    official = glob_dataset(
        root=str(root / "val2017"),
        img_size=VAE,
        img_glob="*.jpg",
        vit_norm=True,
        random_flip=False,
        vit_input_resolution=VIT,
    )
    ours = CocoDataset(CocoParams(root=str(root), image_size=VIT, **settings()), split="val")
    assert [Path(p).name for p in official.episodes] == [
        ours.image_info(i)["file_name"] for i in range(len(ours))
    ]  # GlobDataset's sorted glob is the annotation file's order here
    dec = LatentDiffusionDecoder(
        LatentDiffusionParams(tiny=True, tiny_width=8),
        Dims(image_size=(VAE, VAE), slot_dim=8, num_slots=2),
    )
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    worst, means = 0.0, []
    for i in range(len(ours)):
        expected = official[i]
        image = ours[i]["image"]
        torch.testing.assert_close(
            (image - mean) / std, expected["pixel_values_vit"], rtol=0, atol=1e-6
        )
        diff = (dec.vae_input(image[None])[0] - expected["pixel_values"]).abs()
        worst, means = max(worst, diff.max().item()), [*means, diff.mean().item()]
    # the residual the protocol file states: the VAE input comes from the 448 crop
    assert 0 < worst < 0.35 and max(means) < 0.03, (worst, means)
    print(f"VAE input vs LSD pixel_values: max |diff| {worst:.4f}, mean {max(means):.5f}")
