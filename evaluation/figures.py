"""Pictures of explanations: Grad-CAM overlays on images."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from gcmodels.gradcam import gradcam


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps ``[B, h, w]`` bilinearly resized to the image size ``[B, H, W]``."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def save_gradcam_grid(
    net,
    images: torch.Tensor,
    classes: torch.Tensor,
    path: str | Path,
    mode: str = "elementwise",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save a 2-row grid: the images, and their Grad-CAM maps (for ``classes``) over them."""
    logits, maps = gradcam(net, images, classes, mode)
    maps = upsample_maps(maps.detach(), tuple(images.shape[-2:]))
    predicted = logits.argmax(1)
    count = images.shape[0]
    fig, axes = plt.subplots(2, count, figsize=(1.8 * count, 4.0), squeeze=False)
    for i in range(count):
        picture = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        heat = maps[i]
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
        name = class_names[int(classes[i])] if class_names else str(int(classes[i]))
        guess = class_names[int(predicted[i])] if class_names else str(int(predicted[i]))
        axes[0, i].imshow(picture)
        axes[0, i].set_title(f"{name}\npred: {guess}", fontsize=7)
        axes[1, i].imshow(picture)
        axes[1, i].imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(f"Grad-CAM ({mode}) of the labelled class", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
