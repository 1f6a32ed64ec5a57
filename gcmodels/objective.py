"""The training objective: classification loss plus lambda times the Grad-CAM consistency loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from gcmodels.gradcam import MODES as CAM_MODES
from gcmodels.gradcam import gradcam
from gcmodels.networks import ExplainableNet
from gcmodels.options import Options, Registry
from losses import CompositeLayout, classification_loss, composite_target, consistency_l1, make_composite

# The training objectives by config name (``loss=``), with their options.
OBJECTIVES = Registry("loss")


class CEOptions(Options):
    """Plain classification loss: cross-entropy, or on multi-label data BCE with logits summed
    over the classes (the baseline)."""


class GCOptions(Options):
    """Classification loss + ``lambda`` x the Grad-CAM consistency loss (conf/loss/gc.yaml says
    what each option does)."""

    lam: Annotated[float, Field(alias="lambda", ge=0)]
    cam_mode: Literal[CAM_MODES]
    detach_target: bool
    # How a multi-label image's explained class is drawn: by instance count (the authors' draw
    # over annotations) or uniformly over its labels.
    positive: Literal["instances", "labels"]
    # The other images of the training batch, or three more training images loaded with each
    # sample (the authors' code).
    composite_source: Literal["batch", "dataset"]
    # One composite per sample (the paper's), or one per group of four batch images that are each
    # other's distractors.
    composites: Literal["per_sample", "shared"]

    @field_validator("composites")
    @classmethod
    def shared_needs_batch(cls, composites: str, info: ValidationInfo) -> str:
        if composites == "shared" and info.data.get("composite_source") == "dataset":
            # Each sample loads its own distractors there: no batch image is another's to share with.
            raise ValueError("shared groups the batch's own images and needs loss.composite_source=batch")
        return composites


OBJECTIVES.register("ce", CEOptions)(classification_loss)


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


OBJECTIVES.register("gc", GCOptions)(gc_objective)
