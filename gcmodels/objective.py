"""The training objective: classification loss plus lambda times the Grad-CAM consistency loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gcmodels.gradcam import gradcam
from gcmodels.networks import ExplainableNet
from losses import CompositeLayout, classification_loss, composite_target, consistency_l1, make_composite


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    classification_loss: torch.Tensor
    consistency_loss: torch.Tensor
    logits: torch.Tensor
    num_composites: int


def gc_objective(
    net: ExplainableNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    layout: CompositeLayout,
    lam: float,
    cam_mode: str = "elementwise",
    detach_target: bool = False,
    distractor_images: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """``classification(f(x), y) + lam * L1(g_c, comp(k, g_x, 0, 0, 0))`` for one batch.

    Both Grad-CAM maps keep their graph (``create_graph=True``): the caller's single ordinary
    ``backward()`` of ``loss`` then runs the second-order backward through ``dy/dA``. The target
    ``g_x`` is not detached unless ``detach_target`` (the authors' code does not detach it).
    Samples whose layout is invalid (no distractor in the batch) are left out of the GC term.

    ``distractor_images`` ``[B, 3, C, H, W]``: distractors loaded with the samples
    (``loss.composite_source=dataset``); ``layout.distractors`` then index the batch's images
    followed by these (:func:`losses.composite.own_distractors_layout`). Only the composites see
    them: they add nothing to the classification term.

    ``layout.groups`` (``loss.composites=shared``): rows of one group share one composite, which
    goes forward once; each row's map on it is its own gradient (:func:`gcmodels.gradcam.gradcam`).
    The L1 term averages over the rows as in the per-sample mode, so lambda keeps its meaning.
    """
    # Unlabelled multi-label samples (class -1) have no composite; any class serves their map.
    logits, maps = gradcam(net, images, layout.classes.clamp(min=0), cam_mode, create_graph=True)
    classification = classification_loss(logits, targets)
    kept = layout.valid_subset()
    if len(kept) == 0:
        consistency = logits.new_zeros(())
    else:
        tiles = images if distractor_images is None else torch.cat([images, distractor_images.flatten(0, 1)])
        owners = None
        if kept.groups is not None:
            shared, owners = torch.unique(kept.groups, return_inverse=True)
            # One row per group builds its composite: the others describe the same picture.
            first = owners.new_full(shared.shape, len(kept)).scatter_reduce(
                0, owners, torch.arange(len(kept), device=owners.device), "amin")
            composites = make_composite(tiles, kept.select(first))
        else:
            composites = make_composite(tiles, kept)
        _, composite_maps = gradcam(net, composites, kept.classes, cam_mode, create_graph=True, owners=owners)
        target = composite_target(maps[kept.samples], kept.cells, composite_maps.shape[-2:])
        if detach_target:
            target = target.detach()
        consistency = consistency_l1(composite_maps, target)
    return ObjectiveOutput(
        loss=classification + lam * consistency,
        classification_loss=classification,
        consistency_loss=consistency,
        logits=logits,
        num_composites=len(kept),
    )
