"""FID offline: clean-fid's Inception from a local file, cached reference statistics.

clean-fid (0.1.35) downloads its TorchScript Inception (`inception-2015-12-05.pt`, the
TF 2015-12-05 graph translated by NVlabs) into the system temp directory the first time
it runs; these machines have no internet, so nothing here ever calls its downloader.
The weights are looked up in order: an explicit path, $OCL_BENCH_INCEPTION, then the file
clean-fid itself would have cached. Features follow clean-fid's "clean" mode: images are
quantised to uint8 (as if saved to PNG), resized per channel in float with PIL bicubic,
scaled to [-1, 1) as (x - 128) / 128, and the 2048-d pool features are taken.

The Frechet distance is clean-fid's when the generated set has more images than feature
dimensions; with fewer (every test and most quick evaluations) the covariance product is
singular, scipy's sqrtm takes over a minute on 2048 dimensions and its imaginary-part
check may fail, so the same quantity is taken exactly from the small Gram matrix instead:
the non-zero eigenvalues of S_ref S_gen equal those of Y S_ref Y^T when S_gen = Y^T Y.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocl_bench.api.errors import DataError
from ocl_bench.api.weights import file_sha256

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "OCL_BENCH_INCEPTION"
CACHE_ENV = "OCL_BENCH_FID_CACHE"
FEATURE_DIM = 2048
CLEANFID_RESOLUTION = 299
MIN_RESOLUTION = 75  # the smallest input the Inception stem and its strided blocks accept
SOURCE_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)


# --------------------------------------------------------------------------- architecture
# The Inception-v3 graph of the 2015-12-05 TF release in the module layout of clean-fid's
# TorchScript file: `layers` (stem, mixed .. mixed_10, pool2) and the 1008-way `output`.
# Each conv carries its folded batch norm as weight / beta / mean / var (no BN scale).
# Used to check a weights file key by key, and to write random-weight files for tests.


class ConvBNReLU(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else padding
        self.weight = nn.Parameter(torch.empty(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, bias=self.beta, eps=1e-3)
        return F.relu(x)


class Branches(nn.Sequential):
    """Parallel towers whose outputs are concatenated along channels, in order."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        outs: list[Tensor] = []
        for tower in self:
            outs.append(tower(x))
        return torch.cat(outs, 1)


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))


def _avg3() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


def _block_a(cin: int, pool_channels: int) -> Branches:
    return Branches(
        OrderedDict(
            conv=ConvBNReLU(cin, 64, 1),
            tower=_seq(("conv", ConvBNReLU(cin, 48, 1)), ("conv_1", ConvBNReLU(48, 64, 5, 1, 2))),
            tower_1=_seq(
                ("conv", ConvBNReLU(cin, 64, 1)),
                ("conv_1", ConvBNReLU(64, 96, 3, 1, 1)),
                ("conv_2", ConvBNReLU(96, 96, 3, 1, 1)),
            ),
            tower_2=_seq(("pool", _avg3()), ("conv", ConvBNReLU(cin, pool_channels, 1))),
        )
    )


def _block_b(cin: int) -> Branches:
    return Branches(
        OrderedDict(
            conv=ConvBNReLU(cin, 384, 3, 2),
            tower=_seq(
                ("conv", ConvBNReLU(cin, 64, 1)),
                ("conv_1", ConvBNReLU(64, 96, 3, 1, 1)),
                ("conv_2", ConvBNReLU(96, 96, 3, 2)),
            ),
            pool=nn.MaxPool2d(3, stride=2),
        )
    )


def _block_c(cin: int, c: int) -> Branches:
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorised 7x7
    return Branches(
        OrderedDict(
            conv=ConvBNReLU(cin, 192, 1),
            tower=_seq(
                ("conv", ConvBNReLU(cin, c, 1)),
                ("conv_1", ConvBNReLU(c, c, row[0], 1, row[1])),
                ("conv_2", ConvBNReLU(c, 192, col[0], 1, col[1])),
            ),
            tower_1=_seq(
                ("conv", ConvBNReLU(cin, c, 1)),
                ("conv_1", ConvBNReLU(c, c, col[0], 1, col[1])),
                ("conv_2", ConvBNReLU(c, c, row[0], 1, row[1])),
                ("conv_3", ConvBNReLU(c, c, col[0], 1, col[1])),
                ("conv_4", ConvBNReLU(c, 192, row[0], 1, row[1])),
            ),
            tower_2=_seq(("pool", _avg3()), ("conv", ConvBNReLU(cin, 192, 1))),
        )
    )


def _block_d(cin: int) -> Branches:
    return Branches(
        OrderedDict(
            tower=_seq(("conv", ConvBNReLU(cin, 192, 1)), ("conv_1", ConvBNReLU(192, 320, 3, 2))),
            tower_1=_seq(
                ("conv", ConvBNReLU(cin, 192, 1)),
                ("conv_1", ConvBNReLU(192, 192, (1, 7), 1, (0, 3))),
                ("conv_2", ConvBNReLU(192, 192, (7, 1), 1, (3, 0))),
                ("conv_3", ConvBNReLU(192, 192, 3, 2)),
            ),
            pool=nn.MaxPool2d(3, stride=2),
        )
    )


class BlockE(nn.Module):
    """The expanded-filter-bank block: two towers split into 1x3 and 3x1 halves."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBNReLU(cin, 320, 1)
        self.tower_conv = ConvBNReLU(cin, 384, 1)
        self.tower_mixed_conv = ConvBNReLU(384, 384, (1, 3), 1, (0, 1))
        self.tower_mixed_conv_1 = ConvBNReLU(384, 384, (3, 1), 1, (1, 0))
        self.tower_1_conv = ConvBNReLU(cin, 448, 1)
        self.tower_1_conv_1 = ConvBNReLU(448, 384, 3, 1, 1)
        self.tower_1_mixed_conv = ConvBNReLU(384, 384, (1, 3), 1, (0, 1))
        self.tower_1_mixed_conv_1 = ConvBNReLU(384, 384, (3, 1), 1, (1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg3()
        self.tower_2_conv = ConvBNReLU(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        parts = [
            self.conv(x),
            self.tower_mixed_conv(a),
            self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b),
            self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ]
        return torch.cat(parts, 1)


class InceptionV3Graph(nn.Module):
    """Inception-v3 (TF 2015-12-05) in clean-fid's file layout; random weights when built."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            ("conv", ConvBNReLU(3, 32, 3, 2)),
            ("conv_1", ConvBNReLU(32, 32, 3)),
            ("conv_2", ConvBNReLU(32, 64, 3, 1, 1)),
            ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", ConvBNReLU(64, 80, 1)),
            ("conv_4", ConvBNReLU(80, 192, 3)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", _block_a(192, 32)),
            ("mixed_1", _block_a(256, 64)),
            ("mixed_2", _block_a(288, 64)),
            ("mixed_3", _block_b(288)),
            ("mixed_4", _block_c(768, 128)),
            ("mixed_5", _block_c(768, 160)),
            ("mixed_6", _block_c(768, 160)),
            ("mixed_7", _block_c(768, 192)),
            ("mixed_8", _block_d(768)),
            ("mixed_9", BlockE(1280, max_pool=False)),
            ("mixed_10", BlockE(2048, max_pool=True)),
            ("pool2", nn.AvgPool2d(8)),
        )
        self.output = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x: Tensor) -> Tensor:
        """float[B,3,299,299] in [0, 255] -> pool features float[B,2048]."""
        return self.layers((x - 128) / 128).reshape(x.shape[0], -1)


def save_torchscript(model: InceptionV3Graph, path: str | Path) -> Path:
    """Write `model` as clean-fid's weights file would be (a TorchScript archive)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.x calls jit.script deprecated; the file format
        warnings.simplefilter("ignore", FutureWarning)  # clean-fid reads is TorchScript
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weights file and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        graph = InceptionV3Graph()
    return {k: tuple(v.shape) for k, v in graph.state_dict().items()}


# --------------------------------------------------------------------------- weights


def cleanfid_cache_dir() -> Path:
    """Where clean-fid's feature_extractor() keeps its Inception file (features.py)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def candidate_paths(path: str | None) -> list[tuple[str, Path | None]]:
    """(where it came from, file) in lookup order; a directory means the file inside it."""

    def resolve(value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p / INCEPTION_FILE if p.is_dir() else p

    env = os.environ.get(INCEPTION_ENV)
    return [
        ("param inception_path", resolve(path) if path else None),
        (f"${INCEPTION_ENV}", resolve(env) if env else None),
        ("clean-fid's cache", cleanfid_cache_dir() / INCEPTION_FILE),
    ]


def find_inception(path: str | None = None) -> Path:
    """The first existing weights file of the lookup order, or a one-line DataError."""
    candidates = candidate_paths(path)
    for _, file in candidates:
        if file is not None and file.is_file():
            return file
    tried = "; ".join(f"{where}: {file if file else '(not set)'}" for where, file in candidates)
    raise DataError(
        f"clean-fid's Inception weights {INCEPTION_FILE} not found (tried {tried}); "
        f"download {SOURCE_URL} on a machine with internet and give its path"
    )


def weights_sha256(file: Path) -> str:
    """sha256 of the weights file (memoised per path, size and mtime: a run hashes once)."""
    return file_sha256(file)


class InceptionExtractor(nn.Module):
    """clean-fid's InceptionV3W on a local file, never downloading.

    At 299 px the forward is clean-fid's own (InceptionV3W.forward on these attributes;
    clean-fid is imported on use, since importing it takes seconds and every `ocl-bench`
    command discovers the task that uses it). Any other side >= 75 (tests use small
    images) runs the same layers but averages the last feature map globally instead of
    with pool2's fixed 8x8 window; at 299 the two are the same number.
    """

    def __init__(self, file: Path):
        nn.Module.__init__(self)  # InceptionV3W.__init__ would fetch the file from the web
        self.file = file
        self.base = _load_checked(file)
        self.layers = self.base.layers
        self.resize_inside = False
        self.sha256 = weights_sha256(file)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """float[B,3,R,R] in [0, 255], already resized -> float[B,2048]."""
        if tuple(x.shape[-2:]) == (CLEANFID_RESOLUTION, CLEANFID_RESOLUTION):
            from cleanfid.inception_torchscript import InceptionV3W

            return InceptionV3W.forward(self, x)
        return self.pooled_features(x)

    @torch.no_grad()
    def pooled_features(self, x: Tensor) -> Tensor:
        """The same layers at any side >= 75, the last map averaged globally."""
        h = (x - 128) / 128
        for name, layer in self.layers.named_children():
            if name != "pool2":
                h = layer(h)
        return h.mean(dim=(2, 3))


def _load_checked(file: Path) -> torch.jit.ScriptModule:
    """torch.jit.load (TorchScript runs no pickled Python), then the key-by-key check."""
    try:
        with warnings.catch_warnings():  # "jit.load is deprecated": still clean-fid's format
            warnings.simplefilter("ignore", FutureWarning)
            base = torch.jit.load(str(file), map_location="cpu")
    except Exception as err:  # torch raises RuntimeError/ValueError with pages of detail
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{file}: not a TorchScript archive like clean-fid's {INCEPTION_FILE} ({first})"
        ) from None
    got = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    want = expected_shapes()
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = [f"missing keys {few(missing)}" if missing else ""]
        parts.append(f"unexpected keys {few(unexpected)}" if unexpected else "")
        parts.append(
            "wrong shapes " + few([f"{k} {got[k]} != {want[k]}" for k in wrong]) if wrong else ""
        )
        raise DataError(
            f"{file}: not clean-fid's Inception {INCEPTION_FILE} layout: "
            + "; ".join(p for p in parts if p)
        )
    if not hasattr(base, "layers"):
        raise DataError(f"{file}: the archive has no 'layers' module (clean-fid calls it)")
    return base.eval()


_EXTRACTORS: dict[tuple[str, str], InceptionExtractor] = {}


def load_extractor(file: Path) -> InceptionExtractor:
    """The extractor for `file`, loaded once per process and weights hash."""
    key = (str(file.resolve()), weights_sha256(file))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionExtractor(file)
    return _EXTRACTORS[key]


# --------------------------------------------------------------------------- features


def clean_resize(images: Tensor, resolution: int) -> Tensor:
    """float[B,3,H,W] in [0, 1] -> float[B,3,R,R] in [0, 255] as clean-fid reads a PNG:
    quantised to uint8, then PIL bicubic per channel in float."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (resolution, resolution))
    quantised = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = quantised.permute(0, 2, 3, 1).cpu().numpy()
    return torch.from_numpy(np.stack([resize(a) for a in arrays])).permute(0, 3, 1, 2)


@torch.no_grad()
def extract_features(
    extractor: nn.Module, images: Tensor, resolution: int, batch_size: int = 32
) -> np.ndarray:
    """float64[N,2048] Inception features of float[N,3,H,W] images in [0, 1]."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"FID resolution {resolution} is below Inception's {MIN_RESOLUTION}")
    chunks = []
    extractor.eval()
    device = next(extractor.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        x = clean_resize(images[start : start + batch_size], resolution)
        chunks.append(extractor(x.to(device)).double().cpu().numpy())
    if not chunks:
        return np.zeros((0, FEATURE_DIM))
    return np.concatenate(chunks)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as clean-fid computes them: mean and np.cov over images."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu: np.ndarray, sigma: np.ndarray, features: np.ndarray) -> float:
    """FID between the Gaussian (mu, sigma) and the set `features` [N, D].

    ||mu - mu_f||^2 + Tr(sigma) + Tr(sigma_f) - 2 Tr sqrt(sigma sigma_f). With N <= D the
    last trace is taken exactly in N-space (see the module doc), else by clean-fid.
    """
    n, d = features.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 images, got {n}")
    mu_f = features.mean(axis=0)
    if n > d:
        sigma_f = np.cov(features, rowvar=False)
        from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

        return float(cleanfid_frechet_distance(mu_f, sigma_f, mu, sigma))
    y = (features - mu_f) / np.sqrt(n - 1)  # sigma_f = y.T @ y
    gram = y @ sigma @ y.T
    eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu - mu_f
    return float(diff @ diff + np.trace(sigma) + np.einsum("ij,ij->", y, y) - 2 * tr_sqrt)


# --------------------------------------------------------------------------- reference cache


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ocl-bench" / "fid"


def reference_key(
    dataset: str,
    dataset_params: dict[str, Any],
    split: str,
    resolution: int,
    num_images: int,
    weights_sha256: str,
) -> dict[str, Any]:
    """Everything the real images' statistics depend on."""
    return {
        "dataset": dataset,
        "dataset_params": dataset_params,
        "split": split,
        "resolution": resolution,
        "num_images": num_images,
        "extractor": INCEPTION_FILE,
        "weights_sha256": weights_sha256,
        "mode": "clean",
    }


class ReferenceCache:
    """(mu, sigma) of reference sets on disk, one .npz per key.

    The file name is a hash of the key; the key is stored beside the numbers, so a cache
    file explains itself and a hash collision or a foreign file is never read as a hit.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(_key_text(key).encode()).hexdigest()[:20]
        return self.directory / f"{key['dataset']}-{key['split']}-{digest}.npz"

    def load(self, key: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["key"]) == _key_text(key):
                    return stored["mu"], stored["sigma"]
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a torn or foreign file: the caller recomputes and overwrites it
        return None

    def save(self, key: dict[str, Any], mu: np.ndarray, sigma: np.ndarray) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # concurrent evals race here
        np.savez(tmp, mu=mu, sigma=sigma, key=np.array(_key_text(key)))
        tmp.replace(path)
        return path


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)
