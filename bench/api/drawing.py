"""Drawing helpers a plugin may use for its figures: a colour palette for label maps, rows
of images, and an atomic PNG write (a kill never leaves half a PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def palette(n: int) -> np.ndarray:
    """n RGB colours in [0, 1] (tab20, cycled)."""
    cmap = plt.get_cmap("tab20")
    return np.array([cmap(i % 20)[:3] for i in range(n)])


def label_image(labels: np.ndarray, n: int) -> np.ndarray:
    """int[H,W] labels 0..n as an RGB image (label 0 takes the first colour)."""
    return palette(n + 1)[labels]


def image_rows_figure(rows: dict[str, torch.Tensor], path: Path) -> Path:
    """One row per entry of `rows` (e.g. real, generated, recombined), one column per
    image; images float[n,3,H,W] in [0, 1], rows may hold different counts."""
    count = max(t.shape[0] for t in rows.values())
    fig, axes = plt.subplots(
        len(rows), count, figsize=(1.4 * count + 1.2, 1.5 * len(rows)), squeeze=False
    )
    for r, (title, images) in enumerate(rows.items()):
        for c in range(count):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < images.shape[0]:
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(title, fontsize=8)
    return save_figure(fig, Path(path))


def save_figure(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    """Lay out, write beside `path` and rename into place, close."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
