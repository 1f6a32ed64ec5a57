"""``loss=ce``, the classification loss, and ``loss=gc``, which adds lambda times the Grad-CAM
consistency loss of the paper."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from gcmodels.gradcam import MODES as CAM_MODES
from gcmodels.gradcam import gradcam
from gcmodels.networks import UNSTRIDED_STAGES, ExplainableNet, explained_stride
from gcmodels.options import ConfigError, Options
from losses import (
    CompositeLayout,
    classification_loss,
    composite_target,
    consistency_l1,
    make_composite,
    random_layout,
    shared_layout,
)
from losses.composite import own_distractors_layout, positive_weights

from .base import OBJECTIVES, Objective, TrainingStep


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


@OBJECTIVES.register("ce", CEOptions)
class ClassificationObjective(Objective):
    title = "baseline"
    second_order = False

    def step(self, module, batch: dict) -> TrainingStep:
        logits = module.net(batch["image"])
        loss = classification_loss(logits, batch["target"])
        return TrainingStep(loss, logits, {"train/ce": loss})


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



@OBJECTIVES.register("gc", GCOptions)
class GCObjective(Objective):
    """The paper's: :func:`gc_objective` on composites laid out from the batch (or from
    distractors loaded with each sample)."""

    title = "GC"

    def batch_keys(self) -> tuple[str, ...]:
        # Distractors loaded with each sample, with the class it explains and its cell.
        dataset = ("positive", "cell", "distractors") if self.options["composite_source"] == "dataset" else ()
        return ("image", "target", *dataset)

    def setup(self, datamodule, seed: int) -> None:
        if self.options["composite_source"] == "dataset":
            datamodule.set_train_distractors(self.options["positive"])

    def check_data(self, datamodule, model: dict, world_size: int) -> None:
        """An image side that is a whole number of the explained layer's cells, and, when the
        distractors come from the batch, enough images in each process's batch to draw them from."""
        size, name = datamodule.image_size, model["name"]
        stride = explained_stride(model)
        # A transformer's cell is its patch.
        stride_key = "model.patch_size" if "patch_size" in model else "model.output_stride"
        if size % stride:
            # composite_target puts each image's map at the composite map's edges, where the image's
            # own cells are only when its side is a multiple of the stride.
            strides = [option for option in sorted(UNSTRIDED_STAGES) if not size % option]
            other = ("" if not name.startswith("resnet") or not strides
                     else f" or model.output_stride={' or '.join(map(str, strides))}")
            raise ConfigError([("data.image_size", (
                f"{size} is not a multiple of {stride_key}={stride} ({name}'s explained layer has a cell "
                f"per {stride} pixels): loss=gc places each image's Grad-CAM map in its cell of the 2x2 "
                f"composite's map, which matches the image's own cells only at a multiple; use "
                f"data.image_size={math.ceil(size / stride) * stride}{other}"))])
        if self.options["composite_source"] == "batch":
            shared = self.options["composites"] == "shared"
            needed = 4 if shared else 2
            if datamodule.batch_size < needed:
                raise ConfigError([("data.batch_size", (
                    f"{datamodule.global_batch_size} gives {datamodule.batch_size} image(s) to each of {world_size} "
                    f"process(es), and loss=gc (loss.composite_source=batch"
                    f"{', loss.composites=shared' if shared else ''}) builds its composites from {needed} images of "
                    f"a process's batch: give data.batch_size >= {needed * world_size} or "
                    f"loss.{'composites=per_sample' if shared else 'composite_source=dataset'}"))])

    def step(self, module, batch: dict) -> TrainingStep:
        options, images, targets = self.options, batch["image"], batch["target"]
        distractor_images = None
        if options["composite_source"] == "dataset":
            layout = own_distractors_layout(batch["positive"], batch["cell"])
            distractor_images = batch["distractors"]
        else:
            weights = positive_weights(batch, module.hparams.multilabel, options["positive"])
            draw = shared_layout if options["composites"] == "shared" else random_layout
            layout = draw(targets, module.hparams.num_classes, module.layout_generator(), weights)
        out = gc_objective(module.net, images, targets, layout, float(options["lambda"]), options["cam_mode"],
                           options["detach_target"], distractor_images)
        size = len(images)
        means = {}
        if layout.groups is not None:
            # Shared composites: the share of samples no group of four took, trained on a
            # per-sample composite instead (multi-label batches fall back far more often).
            means["train/gc_fallback"] = (layout.valid & (layout.groups >= size)).sum() / size
        return TrainingStep(out.loss, out.logits,
                            {"train/ce": out.classification_loss, "train/gc": out.consistency_loss},
                            sums={"train/gc_left_out": float(size - out.num_composites)}, means=means)
