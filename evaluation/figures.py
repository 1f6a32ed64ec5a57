"""Pictures of explanations: heatmap overlays on images, in a grid. Drawing only: the panels
come from ``evaluation.panels``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt
import torch

from evaluation.metrics.functional import upsample


# One picture of a grid: (image [3,H,W] in [0,1], heatmap [h,w] or None, caption).
Panel = tuple[torch.Tensor, torch.Tensor | None, str]


def save_overlay_grid(rows: Sequence[tuple[str, Sequence[Panel]]], path: str | Path, title: str) -> Path:
    """Save a grid with one row per ``(row label, panels)``; heatmaps are upsampled to their
    image, min-max scaled and drawn over it."""
    columns = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns, 2.1 * len(rows)), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(panels):
                continue
            image, heatmap, caption = panels[c]
            ax.imshow(image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
            if heatmap is not None:
                heat = upsample(heatmap.detach().float().cpu()[None], image.shape[-2:])[0]
                heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(caption, fontsize=6)
        axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
