"""The contrastive Grad-CAM consistency loss (CGC: Pillai et al., "Consistent Explanations by
Contrastive Learning", CVPR 2022), as pure tensor functions: the maps' normalisation, the warp of an
image's map by the crop and flip that made its augmented view, and InfoNCE with in-batch
negatives. Written here because the authors' code warps one sample at a time in Python and
hard-codes CUDA; these are batched, device-agnostic and differentiable (the loss backpropagates
through Grad-CAM maps taken with ``create_graph=True``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The authors' epsilon, in the sum normalisation and added to every pixel after it.
EPSILON = 1e-8


def sum_normalize(maps: Tensor) -> Tensor:
    """``[B, H, W]`` non-negative maps as the authors' ``compute_gradcam_mask`` leaves them: each
    divided by its sum (plus 1e-8), then 1e-8 added to every pixel (an all-zero map becomes
    uniform, never NaN)."""
    return maps / (maps.sum(dim=(1, 2), keepdim=True) + EPSILON) + EPSILON


def unit_rows(maps: Tensor) -> Tensor:
    """``[B, H, W]`` maps flattened to ``[B, H * W]`` rows of unit L2 norm."""
    flat = maps.flatten(1)
    return flat / flat.norm(p=2, dim=1, keepdim=True)


def normalize_maps(maps: Tensor) -> Tensor:
    """``[B, H, W]`` non-negative maps as the authors compare them: :func:`sum_normalize`, then
    :func:`unit_rows`: ``[B, H * W]``."""
    return unit_rows(sum_normalize(maps))


def warp_maps(maps: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Each map of ``maps`` ``[B, H, W]`` cropped to its box ``boxes[b] = (top, left, height,
    width)`` (pixels), resized to ``size x size`` bilinearly as ``F.interpolate(...,
    align_corners=False)`` resizes the crop, and flipped left-right where ``flips[b]``: the view
    that a RandomResizedCrop with that box and flip made of the image, applied to its map.

    One ``grid_sample`` for the whole batch: each output pixel samples the source coordinate that
    ``interpolate`` computes for it, clamped to the crop as ``interpolate`` clamps to its input, so
    the result equals the per-sample crop, resize and flip (up to rounding) and is differentiable
    in ``maps``."""
    batch, height, width = maps.shape
    boxes = boxes.to(maps.dtype)
    top, left, box_height, box_width = boxes.unbind(1)
    centres = torch.arange(size, dtype=maps.dtype, device=maps.device) + 0.5

    def source(start: Tensor, extent: Tensor) -> Tensor:
        # interpolate's source index for each output pixel, inside the crop [0, extent - 1].
        inside = (centres[None] * (extent[:, None] / size) - 0.5).clamp(min=0)
        return start[:, None] + torch.minimum(inside, extent[:, None] - 1)

    ys, xs = source(top, box_height), source(left, box_width)
    # grid_sample's normalised coordinates (align_corners=False): pixel p is at (2p + 1) / n - 1.
    grid_x = ((2 * xs + 1) / width - 1)[:, None, :].expand(batch, size, size)
    grid_y = ((2 * ys + 1) / height - 1)[:, :, None].expand(batch, size, size)
    warped = F.grid_sample(maps[:, None], torch.stack([grid_x, grid_y], dim=-1), mode="bilinear",
                           padding_mode="border", align_corners=False)[:, 0]
    return torch.where(flips.bool()[:, None, None], warped.flip(-1), warped)


def info_nce(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """InfoNCE with in-batch negatives, as the authors' ``NCESoftmaxLoss``: for each row ``i`` of
    the unit-norm ``anchors`` ``[B, N]`` (the augmented views' maps), the logits are its similarity
    to ``positives[i]`` (the image's map warped to that view) followed by its similarity to every
    other anchor ``j != i``, divided by ``temperature``; the loss is the cross-entropy of class 0,
    averaged over the batch."""
    batch = anchors.shape[0]
    positive = (anchors * positives).sum(dim=1, keepdim=True)
    others = ~torch.eye(batch, dtype=torch.bool, device=anchors.device)
    negatives = (anchors @ anchors.T)[others].view(batch, batch - 1)
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=anchors.device))


def consistency_term(view_maps: Tensor, aug_maps: Tensor, boxes: Tensor, flips: Tensor, temperature: float,
                     contrast: bool = True) -> Tensor:
    """CGC's explanation term from the Grad-CAM maps ``[B, S, S]`` (upsampled to the input side
    ``S``, non-negative) of each image's ``view`` and of its augmented view: the view's map, sum
    normalised (:func:`sum_normalize`), is warped by the crop ``boxes`` and ``flips`` that made the
    augmented view (:func:`warp_maps`); both are then unit rows, compared by :func:`info_nce`, or,
    without ``contrast`` (the authors' ablation), by the mean squared difference of the rows (no
    negatives)."""
    size = view_maps.shape[-1]
    anchors = unit_rows(sum_normalize(aug_maps))
    positives = unit_rows(warp_maps(sum_normalize(view_maps), boxes, flips, size))
    if contrast:
        return info_nce(anchors, positives, temperature)
    return F.mse_loss(anchors, positives)
