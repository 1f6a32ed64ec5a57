"""Losses that guide a model's explanations with object masks (Rao et al., "Studying How to
Efficiently and Effectively Guide Models with Explanations", ICCV 2023), as pure tensor functions
of a batch of attribution maps ``[B, H, W]`` and masks (bool ``[B, H, W]``): one value per image.

Written here rather than taken from the authors' ``losses.py``: theirs loop over the images and
their boxes in Python and build the masks on the fly; these take the batch at once, from masks of
any shape (exact object masks as well as boxes), and give every image a defined value (an empty
mask or an all-zero map included), differentiably in the maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this total positive attribution, Energy counts the map as empty (the authors' 1e-7).
ENERGY_FLOOR = 1e-7


def positive_part(maps: Tensor) -> Tensor:
    return maps.clamp(min=0)


def scale_by_max(maps: Tensor) -> Tensor:
    """Each map divided by its largest absolute value (an all-zero map stays as it is): the
    authors' ``binarize`` step, which puts a map in [-1, 1]."""
    largest = maps.abs().amax(dim=(1, 2), keepdim=True)
    return torch.where(largest == 0, maps, maps / torch.where(largest == 0, 1, largest))


def energy_loss(maps: Tensor, masks: Tensor) -> Tensor:
    """``1 - sum(a+ inside the mask) / sum(a+)`` per image, ``a+`` the positive part; where
    ``sum(a+)`` is below :data:`ENERGY_FLOOR`, ``1 - sum(a+ inside)`` (the authors' rule)."""
    positive = positive_part(maps)
    inside = (positive * masks).sum(dim=(1, 2))
    total = positive.sum(dim=(1, 2))
    empty = total < ENERGY_FLOOR
    return torch.where(empty, 1 - inside, 1 - inside / torch.where(empty, 1, total))


def l1_loss(maps: Tensor, masks: Tensor) -> Tensor:
    """``mean |a - mask|`` over each image's pixels."""
    return (maps - masks.to(maps.dtype)).abs().mean(dim=(1, 2))


def rrr_loss(maps: Tensor, masks: Tensor) -> Tensor:
    """``sum(a^2 outside the mask)`` per image ("right for the right reasons")."""
    return (maps.square() * ~masks).sum(dim=(1, 2))


def ppce_loss(maps: Tensor, masks: Tensor) -> Tensor:
    """``BCE(a, 1)`` averaged over the pixels inside each image's mask (maps in [0, 1]; the log
    clamped at -100 as ``torch.nn.BCELoss`` does); 0 for an empty mask, which has no pixel to
    score."""
    # In float32 outside autocast, which refuses binary_cross_entropy (unsafe in half precision).
    with torch.autocast(maps.device.type, enabled=False):
        maps = maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps
        bce = F.binary_cross_entropy(maps.clamp(0, 1), torch.ones_like(maps), reduction="none")
    count = masks.sum(dim=(1, 2))
    return (bce * masks).sum(dim=(1, 2)) / count.clamp(min=1)


# Each loss with the post-processing the authors apply before it: (positive part, divide by max |a|).
GUIDANCE_LOSSES = {
    "energy": (energy_loss, False, False),
    "l1": (l1_loss, True, True),
    "rrr": (rrr_loss, False, True),
    "ppce": (ppce_loss, True, True),
}


def guidance_terms(name: str, maps: Tensor, masks: Tensor) -> Tensor:
    """The per-image term ``[B]`` of guidance loss ``name`` (:data:`GUIDANCE_LOSSES`) on raw
    attribution ``maps`` ``[B, h, w]``: the loss's own post-processing, then, for maps coarser
    than the masks ``[B, H, W]`` (Grad-CAM at a layer), a bilinear upsampling to the masks' size
    (the authors' order), then the loss."""
    loss, positive, scaled = GUIDANCE_LOSSES[name]
    if positive:
        maps = positive_part(maps)
    if scaled:
        maps = scale_by_max(maps)
    if maps.shape[-2:] != masks.shape[-2:]:
        maps = F.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear")[:, 0]
    return loss(maps, masks)
