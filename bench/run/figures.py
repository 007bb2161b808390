"""A run's own figures: masks (image, ground truth, each slot's mask, reconstruction) and
training curves. Each is written atomically (a kill never leaves half a PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ocl_bench.api.contracts import Batch, ModelOutput  # noqa: E402
from ocl_bench.api.drawing import label_image, palette, save_figure  # noqa: E402
from ocl_bench.api.matching import masks_to_pred  # noqa: E402


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
            panels.append(("ground truth", label_image(gt, int(gt.max()))))
        else:
            panels.append(("ground truth", np.ones_like(img)))
        panels.append((f"{source} masks", palette(k)[pred[r]] * 0.6 + img * 0.4))
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
    return save_figure(fig, Path(path))


def _read_log(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill ends the log
    return rows


def training_figure(run_dir: Path) -> Path | None:
    """figures/training.png: the loss terms and lr per step and, when the run measured
    them (train.eval_every), the validation scores; None when nothing was logged."""
    run_dir = Path(run_dir)
    train_log = _read_log(run_dir / "train_log.jsonl")
    if not train_log:
        return None
    eval_log = _read_log(run_dir / "eval_log.jsonl")
    panels = 2 if eval_log else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(6 * panels + (1.5 if eval_log else 0), 3.6), squeeze=False
    )
    ax = axes[0, 0]
    steps = [r["step"] for r in train_log]
    terms = [k for k in train_log[-1] if k not in ("step", "lr")]
    if len(terms) == 2:  # the total is the one objective's term: draw it once
        terms = ["loss"]
    for key in terms:
        values = [r.get(key, np.nan) for r in train_log]
        ax.plot(steps, values, label=key, linewidth=0.8 if key == "loss" else 0.6)
    if all(r.get("loss", 0) > 0 for r in train_log):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper right")
    if "lr" in train_log[-1]:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r.get("lr", np.nan) for r in train_log], color="grey", linewidth=0.6)
        lr_ax.set_ylabel("lr", color="grey")
    if eval_log:
        # colour: the metric; line style: the masks scored (decoder solid, attention dashed)
        ax = axes[0, 1]
        eval_steps = [r["step"] for r in eval_log]
        keys = [k for k in eval_log[-1] if k != "step"]
        metrics = list(dict.fromkeys(k.rsplit(".", 1)[-1] for k in keys))
        colours = plt.get_cmap("tab10")
        for key in keys:
            metric = key.rsplit(".", 1)[-1]
            ax.plot(
                eval_steps,
                [r.get(key, np.nan) for r in eval_log],
                marker=".",
                color=colours(metrics.index(metric) % 10),
                linestyle="--" if ".attn." in key else "-",
                label=key.split(".", 1)[-1],  # the task's name is the panel's title
            )
        ax.set_title(", ".join(dict.fromkeys(k.split(".", 1)[0] for k in keys)), fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("validation score")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(fig, run_dir / "figures" / "training.png", dpi=110)
