"""The evaluation figure: image, ground truth, each slot's mask, reconstruction."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.contracts import Batch, ModelOutput  # noqa: E402
from tasks.object_discovery_metrics import masks_to_pred  # noqa: E402


def _palette(n: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20")
    return np.array([cmap(i % 20)[:3] for i in range(n)])


def _label_image(labels: np.ndarray, n: int) -> np.ndarray:
    return _palette(n + 1)[labels]


def _gt_labels(masks: torch.Tensor) -> np.ndarray:
    """bool[M,H,W] -> int[H,W] with 0 background and i+1 for object i."""
    m = masks.cpu().numpy()
    labels = np.zeros(m.shape[1:], dtype=np.int64)
    for i in range(m.shape[0]):
        labels[m[i]] = i + 1
    return labels


def mask_figure(
    batch: Batch, out: ModelOutput, path: Path, count: int = 4, source: str = "decoder"
) -> Path:
    """One row per image: input, GT, predicted segmentation, each slot's mask, reconstruction."""
    count = min(count, batch.size)
    images = batch.images[:count].float().cpu()
    size = tuple(images.shape[-2:])
    soft = out.masks(source).float()[:count]
    k = soft.shape[1]
    soft_up = torch.nn.functional.interpolate(soft, size=size, mode="bilinear").cpu()
    pred = masks_to_pred(soft, size).cpu().numpy()
    recon = out.decoding.extras.get("image")
    cols = 3 + k + (1 if recon is not None else 0)
    fig, axes = plt.subplots(count, cols, figsize=(1.6 * cols, 1.6 * count), squeeze=False)
    for r in range(count):
        img = images[r].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [("image", img)]
        if batch.instance_masks is not None:
            gt = _gt_labels(batch.instance_masks[r])
            panels.append(("ground truth", _label_image(gt, int(gt.max()))))
        else:
            panels.append(("ground truth", np.ones_like(img)))
        panels.append((f"{source} masks", _palette(k)[pred[r]] * 0.6 + img * 0.4))
        for s in range(k):
            m = soft_up[r, s, :, :, None].numpy()
            panels.append((f"slot {s}", img * m + (1.0 - m)))  # white where the slot is absent
        if recon is not None:
            panels.append(
                ("reconstruction", recon[r].float().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
            )
        for c, (title, panel) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        for c in range(len(panels), cols):
            axes[r, c].axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
