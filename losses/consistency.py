"""Loss terms of the GC objective (Pillai & Pirsiavash, Eq. 4-5), as pure tensor functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices ``[B]``, averaged over the batch; for multi-hot targets
    ``[B, K]``, BCE with logits summed over the classes and averaged over the batch.

    The multi-label sum is the authors' ``80 * BCE_mean`` on COCO's 80 classes: the paper's lambda
    (1 on COCO) weighs the GC term against this scale, not against the mean over classes.
    """
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets.long())
    bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return bce.sum(dim=1).mean()


def consistency_l1(composite_maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 distance between the composites' normalised maps and their targets, averaged over the
    batch and the map cells (zero for an empty batch, so it can always be added)."""
    if composite_maps.shape != targets.shape:
        raise ValueError(
            f"composite maps {tuple(composite_maps.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    if composite_maps.numel() == 0:
        return composite_maps.sum()
    return (composite_maps - targets).abs().mean()
