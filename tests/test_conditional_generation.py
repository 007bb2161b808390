"""conditional_generation: FID (clean-fid's Inception from a local file), PSNR, SSIM.

Tests never download: the Inception file is the real architecture with random weights,
written by the test in clean-fid's file layout, and every network entry point refuses.
Images are resized to 75 px (Inception's smallest input) instead of 299 to stay fast.
"""

from __future__ import annotations

import hashlib
import socket
import urllib.request
from pathlib import Path

import cleanfid.downloads_helper
import cleanfid.inception_torchscript
import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from ocl_bench.api.contracts import Batch, Features, ModelOutput, ReconstructionOutput, Slots
from ocl_bench.api.errors import DataError, IncompatiblePluginsError
from ocl_bench.api.plugin import Decoder
from ocl_bench.api.tasking import EvalContext
from ocl_bench.run.compose import build_model, check_compatible
from ocl_bench.run.config import load_config
from ocl_bench.run.data import make_dataset
from ocl_bench.run.registry import registry
from ocl_bench.tasks import fid as fidlib
from ocl_bench.tasks.conditional_generation import (
    ConditionalGeneration,
    ConditionalGenerationParams,
)
from tests.conftest import TINY_MODEL

SMALL = 75  # FID resolution in these tests
TINY = [*TINY_MODEL, "dataset.val_size=8", "decoder.hidden=16"]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("inception")
    return fidlib.save_torchscript(fidlib.InceptionV3Graph(), directory / fidlib.INCEPTION_FILE)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Every way clean-fid or urllib could reach the network raises and is recorded; the
    machine's own clean-fid cache and $OCL_BENCH_INCEPTION are hidden."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args)[:80])
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", refuse)
    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", refuse)
    empty = tmp_path / "empty-cleanfid-cache"
    empty.mkdir()
    monkeypatch.setattr(fidlib, "cleanfid_cache_dir", lambda: empty)
    monkeypatch.delenv(fidlib.INCEPTION_ENV, raising=False)
    return attempts


# ------------------------------------------------------------------ Frechet distance


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated dimensions, as real features
    return rng.normal(size=(n, d)) @ mixing + shift


def _scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n", [12, 150])  # fewer images than dimensions, and more
def test_fid_of_a_set_with_itself_is_zero(n: int) -> None:
    feats = _features(n, 64, seed=1)
    mu, sigma = fidlib.statistics(feats)
    scale = np.trace(sigma)
    assert abs(fidlib.frechet_distance(mu, sigma, feats)) < 1e-6 * scale


@pytest.mark.parametrize("n_fake", [10, 120])
def test_fid_equals_the_scipy_sqrtm_formula(n_fake: int) -> None:
    real = _features(90, 64, seed=2)
    fake = _features(n_fake, 64, seed=3, shift=0.3)
    expected = _scipy_fid(real, fake)
    got = fidlib.frechet_distance(*fidlib.statistics(real), fake)
    assert got == pytest.approx(expected, rel=1e-6)
    assert got > 0.3**2 * 64 * 0.5  # the mean shift alone contributes 0.09 per dimension


# ------------------------------------------------------------------ weights


def test_random_inception_loads_strictly_and_is_cleanfids_model(inception_file: Path) -> None:
    extractor = fidlib.load_extractor(inception_file)
    assert extractor.sha256 == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    images = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    # clean-fid's own class, built from the same directory, without its download
    reference = cleanfid.inception_torchscript.InceptionV3W(
        str(inception_file.parent), download=False
    )
    with torch.no_grad():
        expected = reference(images)
        got = extractor(images)
        pooled = extractor.pooled_features(images)  # the any-size path tests run on
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (1, fidlib.FEATURE_DIM)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-6)


class _RenamedHead(fidlib.InceptionV3Graph):
    """'output.*' missing, 'head.*' unexpected. A class of its own: TorchScript caches the
    compiled type per class, so renaming an attribute of an instance fails to script once
    another test scripted the original."""

    def __init__(self) -> None:
        super().__init__()
        self.head = self.output
        del self.output


def test_wrong_key_fails_in_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = fidlib.save_torchscript(_RenamedHead(), tmp_path / fidlib.INCEPTION_FILE)
    with pytest.raises(DataError) as err:
        fidlib.load_extractor(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg
    assert "missing keys output.bias, output.weight" in msg
    assert "unexpected keys head.bias, head.weight" in msg

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not an archive" * 100)
    with pytest.raises(DataError) as err:
        fidlib.load_extractor(garbage)
    assert "\n" not in str(err.value) and str(garbage) in str(err.value)


def test_missing_weights_error_names_all_three_places(
    offline: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(fidlib.INCEPTION_ENV, str(tmp_path / "from-env"))
    with pytest.raises(DataError) as err:
        fidlib.find_inception(str(tmp_path / "from-param.pt"))
    msg = str(err.value)
    assert "\n" not in msg
    for place in (
        tmp_path / "from-param.pt",
        tmp_path / "from-env",
        fidlib.cleanfid_cache_dir() / fidlib.INCEPTION_FILE,
    ):
        assert str(place) in msg
    assert fidlib.INCEPTION_FILE in msg and fidlib.INCEPTION_ENV in msg
    assert not offline


def test_weights_are_looked_up_param_then_env_then_cleanfid_cache(
    offline: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    places = {}
    for name in ("param", "env", "cache"):
        (tmp_path / name).mkdir()
        places[name] = tmp_path / name / fidlib.INCEPTION_FILE
        places[name].write_bytes(b"x")
    monkeypatch.setattr(fidlib, "cleanfid_cache_dir", lambda: tmp_path / "cache")
    assert fidlib.find_inception() == places["cache"]
    monkeypatch.setenv(fidlib.INCEPTION_ENV, str(tmp_path / "env"))  # a directory works
    assert fidlib.find_inception() == places["env"]
    assert fidlib.find_inception(str(places["param"])) == places["param"]
    places["env"].unlink()  # a dangling env var falls through to the cache
    assert fidlib.find_inception() == places["cache"]


def test_reference_cache_is_keyed_and_ignores_foreign_files(tmp_path: Path) -> None:
    cache = fidlib.ReferenceCache(tmp_path)
    key = fidlib.reference_key("shapes", {"image_size": 32}, "val", 299, 8, "abc")
    mu, sigma = np.arange(3.0), np.eye(3)
    cache.save(key, mu, sigma)
    loaded = cache.load(key)
    assert loaded is not None and np.array_equal(loaded[0], mu)
    for change in ({"num_images": 9}, {"weights_sha256": "abd"}, {"split": "train"}):
        assert cache.load({**key, **change}) is None
    other = fidlib.reference_key("shapes", {"image_size": 64}, "val", 299, 8, "abc")
    assert cache.load(other) is None
    cache.path(key).write_bytes(b"torn")
    assert cache.load(key) is None


# ------------------------------------------------------------------ the task


class CopyDecoder(nn.Module, Decoder):
    """Renders the image its slots carry (one slot per colour channel), times `gain`."""

    def __init__(self, size: int, gain: float):
        super().__init__()
        self.size, self.gain = size, gain

    def generate(
        self,
        slots: Slots,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        b = slots.slots.shape[0]
        return slots.slots.reshape(b, 3, self.size, self.size) * self.gain


class CopyModel(nn.Module):
    def __init__(self, size: int, gain: float = 1.0):
        super().__init__()
        self.decoder = CopyDecoder(size, gain)

    def forward(self, batch: Batch) -> ModelOutput:
        b, _, h, w = batch.images.shape
        x = batch.images.flatten(2)
        return ModelOutput(
            features=Features(tokens=x.transpose(1, 2), grid=(h, w)),
            slots=Slots(slots=x, attn=torch.full((b, h * w, 3), 1 / 3)),
            decoding=ReconstructionOutput(reconstruction=x, target=x),
        )


def _shapes(count: int = 8):
    shapes = registry().get("dataset", "shapes")
    return shapes(shapes.Params(image_size=32, val_size=count), "val")


def _context(model: nn.Module, data, out_dir: Path | None, count: int = 8) -> EvalContext:
    return EvalContext(
        model=model,
        dataset=lambda split: data,
        split="val",
        num_images=count,
        batch_size=4,
        device=torch.device("cpu"),
        progress=False,
        out_dir=out_dir,
    )


def test_psnr_and_ssim_are_means_of_per_image_scores(tmp_path: Path) -> None:
    data = _shapes()
    task = ConditionalGeneration(ConditionalGenerationParams(fid="off", figure_images=0))
    same = {r.metric: r for r in task.evaluate(_context(CopyModel(32), data, None)).records}
    assert same["psnr"].value == float("inf")
    assert same["ssim"].value == pytest.approx(1.0, abs=1e-6)
    assert same["psnr"].num_images == 8 and same["psnr"].resolution == (32, 32)
    assert "fid" not in same

    dim = {r.metric: r for r in task.evaluate(_context(CopyModel(32, 0.8), data, None)).records}
    real = data.collate([data[i] for i in range(8)]).images.double()
    mse = ((0.2 * real) ** 2).flatten(1).mean(1)
    assert dim["psnr"].value == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert 0 < dim["ssim"].value < same["ssim"].value


def test_fid_if_available_skips_with_one_warning_line(
    offline: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _shapes(4)
    params = ConditionalGenerationParams(figure_images=0)
    assert params.fid == "if_available"
    result = ConditionalGeneration(params).evaluate(_context(CopyModel(32), data, None, 4))
    assert [r.metric for r in result.records] == ["psnr", "ssim"]
    assert fidlib.INCEPTION_FILE in result.info["fid_skipped"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "FID skipped" in err[0]
    with pytest.raises(DataError, match=fidlib.INCEPTION_ENV):
        ConditionalGeneration(ConditionalGenerationParams(fid="required")).evaluate(
            _context(CopyModel(32), data, None, 4)
        )
    assert not offline


def test_fid_of_generated_equal_to_real_is_zero(
    offline: list[str], inception_file: Path, tmp_path: Path
) -> None:
    params = ConditionalGenerationParams(
        fid="required",
        inception_path=str(inception_file),
        fid_resolution=SMALL,
        fid_cache=str(tmp_path / "cache"),
        figure_images=4,
    )
    task = ConditionalGeneration(params)
    result = task.evaluate(_context(CopyModel(32), _shapes(), tmp_path))
    fid = next(r for r in result.records if r.metric == "fid")
    assert abs(fid.value) < 1e-6
    figure = Path(result.figures[0])
    assert figure.is_file() and figure.parent == tmp_path / "figures"
    assert not offline


def test_recombined_row_mixes_slots_of_several_images() -> None:
    data = _shapes(4)
    batch = data.collate([data[i] for i in range(4)])
    model = CopyModel(32)
    out = model(batch)
    task = ConditionalGeneration(ConditionalGenerationParams(figure_images=4, seed=3))
    real = batch.images
    rows = task._figure_rows(model.decoder, real, real, out.slots)
    assert list(rows) == ["real", "generated", "recombined slots"]
    mixed = rows["recombined slots"]
    assert mixed.shape == real.shape
    # every channel (slot) of a recombined image is that channel of some real image
    for i in range(4):
        for c in range(3):
            assert any(torch.equal(mixed[i, c], real[j, c]) for j in range(4))
    assert not torch.equal(mixed, real)


def test_end_to_end_on_the_default_model_reads_the_cache_second_time(
    offline: list[str],
    inception_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = load_config(None, [*TINY, "tasks.conditional_generation.fid=required"])
    data = make_dataset(cfg.dataset, "val")
    torch.manual_seed(0)
    model = build_model(cfg, data.image_size)
    extracted: list[int] = []
    real_extract = fidlib.extract_features

    def counting(extractor, images, resolution, batch_size=32):
        extracted.append(images.shape[0])
        return real_extract(extractor, images, resolution, batch_size)

    monkeypatch.setattr(fidlib, "extract_features", counting)
    params = ConditionalGenerationParams(
        fid="required",
        inception_path=str(inception_file.parent),  # the directory form
        fid_resolution=SMALL,
        fid_cache=str(tmp_path / "cache"),
        figure_images=3,
    )
    torch.manual_seed(1)  # slot initialisation noise, as evaluate() seeds before each task
    first = ConditionalGeneration(params).evaluate(_context(model, data, tmp_path))
    records = {r.metric: r for r in first.records}
    assert set(records) == {"psnr", "ssim", "fid"}
    assert np.isfinite(records["fid"].value) and records["fid"].value > 0
    assert np.isfinite(records["psnr"].value) and -1 <= records["ssim"].value <= 1
    protocol = records["fid"].protocol
    assert protocol is not None
    assert protocol["images"] == 8 and protocol["resolution"] == SMALL
    assert protocol["extractor"] == fidlib.INCEPTION_FILE and protocol["mode"] == "clean"
    assert protocol["package"].startswith("clean-fid 0.")
    assert protocol["weights_sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    assert "val" in protocol["reference"] and "shapes" in protocol["reference"]
    assert records["fid"].resolution == (SMALL, SMALL) and records["fid"].num_images == 8
    assert first.info["fid_reference_cached"] is False
    assert Path(first.info["fid_reference_file"]).is_file()
    assert sum(extracted) == 16  # generated and real images

    extracted.clear()
    torch.manual_seed(1)
    second = ConditionalGeneration(params).evaluate(_context(model, data, tmp_path))
    assert second.info["fid_reference_cached"] is True
    assert sum(extracted) == 8  # generated images only: the reference came from disk
    again = {r.metric: r.value for r in second.records}
    assert again["fid"] == pytest.approx(records["fid"].value, rel=1e-9)
    assert not offline


def test_composer_rejects_conditional_generation_with_spot_ar() -> None:
    base = ["encoder.name=dino_vits16", "decoder.name=spot_ar"]
    check_compatible(load_config(None, base))
    with pytest.raises(IncompatiblePluginsError) as err:
        check_compatible(load_config(None, [*base, "tasks.conditional_generation.fid=off"]))
    msg = str(err.value)
    assert "conditional_generation" in msg and "spot_ar" in msg and "generation.images" in msg
