"""Every picture the project writes goes through here: the one switch to matplotlib's file-only
backend (no display on clusters), :func:`subplots` and :func:`save_figure`, and the pictures of
explanations (heatmap overlays on images, in a grid; the panels come from ``evaluation.panels``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from evaluation.metrics.functional import upsample


def subplots(*args, **kwargs):
    """``matplotlib.pyplot.subplots`` on the file-only backend."""
    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` and free it."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


class Panel(NamedTuple):
    """One picture of a grid."""

    image: torch.Tensor  # [3, H, W] in [0, 1]
    heatmap: torch.Tensor | None  # [h, w], upsampled to the image when drawn
    caption: str
    mask: torch.Tensor | None = None  # bool [H, W]: the object, outlined when given


# Heatmaps are drawn over a grey, low-contrast copy of the image so that their colours are the
# only colours, with the object's mask outlined in white.
GREY_RANGE = (0.25, 0.75)
HEATMAP_ALPHA = 0.6
COLORMAP = "inferno"


def _grey(image: torch.Tensor) -> torch.Tensor:
    luminance = (image.detach().float().cpu().clamp(0, 1) * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    return GREY_RANGE[0] + (GREY_RANGE[1] - GREY_RANGE[0]) * luminance


def save_overlay_grid(rows: Sequence[tuple[str, Sequence[Panel]]], path: str | Path, title: str) -> Path:
    """Save a grid with one row per ``(row label, panels)``: each image desaturated, its heatmap
    upsampled to it, min-max scaled and drawn over it, its mask (if any) outlined; one colour bar."""
    columns = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns + 0.6, 2.1 * len(rows)), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(panels):
                continue
            panel = panels[c]
            ax.imshow(_grey(panel.image).numpy(), cmap="gray", vmin=0, vmax=1)
            if panel.heatmap is not None:
                heat = upsample(panel.heatmap.detach().float().cpu()[None], panel.image.shape[-2:])[0]
                heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
                ax.imshow(heat.numpy(), cmap=COLORMAP, alpha=HEATMAP_ALPHA, vmin=0, vmax=1)
            if panel.mask is not None and panel.mask.any():
                ax.contour(panel.mask.detach().cpu().float().numpy(), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(panel.caption, fontsize=6)
        axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=7)
    if any(panel.mask is not None for _, panels in rows for panel in panels):
        title += "; white line: the object's mask"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 0.5 / fig.get_figwidth(), 1))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), COLORMAP), ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    bar.set_label("min-max per image", fontsize=6)
    bar.ax.tick_params(labelsize=6)
    return save_figure(fig, path)


# The curves of the faithfulness metrics (``<group>`` in an evaluation's results, keyed by the
# share of pixels moved, ``p=<percent>`` or a block name), their axis titles and whether lower is
# better.
CURVES = {
    "insertion_curve": ("insertion: share of pixels put back", False),
    "deletion_curve": ("deletion: share of pixels removed", True),
    "road_morf_curve": ("ROAD MoRF: share removed, most relevant first", True),
    "road_lerf_curve": ("ROAD LeRF: share removed, least relevant first", False),
    "mprt_spearman_abs": ("randomised blocks, from the logits down", True),
}


def _curve_x(keys: Sequence[str]) -> list[float] | None:
    """The curve's x values from its keys (a share, or ``p=<percent>``); None for block names."""
    try:
        return [float(key[2:]) / 100 if key.startswith("p=") else float(key) for key in keys]
    except ValueError:
        return None


def save_faithfulness_curves(series: Sequence[tuple[str, dict, bool]], path: str | Path, score: str) -> Path | None:
    """One panel per faithfulness curve present: the mean curve of each ``(label, results,
    reference)`` (a reference map's results are drawn dashed); None when no results hold a curve."""
    groups = [group for group in CURVES if any(group in results for _, results, _ in series)]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        title, lower_better = CURVES[group]
        for label, results, reference in series:
            curve = results.get(group)
            if not curve:
                continue
            x = _curve_x(list(curve))
            positions = x if x is not None else list(range(len(curve)))
            ax.plot(positions, list(curve.values()), "--" if reference else "-o", markersize=3, label=label,
                    linewidth=1.0 if reference else 1.5, color="grey" if reference and "noise" in label
                    else "black" if reference else None)
            if x is None:
                ax.set_xticks(positions, list(curve), rotation=60, fontsize=6)
        ax.set_xlabel(title, fontsize=8)
        ax.set_ylabel("rank correlation of |map|" if group.startswith("mprt") else score, fontsize=8)
        ax.set_title("lower is better" if lower_better else "higher is better", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    # The first panel draws every series (the randomisation panel has no reference maps).
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
