"""``loss=cgc``: the contrastive Grad-CAM consistency loss (Pillai et al., "Consistent Explanations
by Contrastive Learning", CVPR 2022), as the authors' ``train_eval_cgc.py`` and
``models/resnet_multigpu_cgc.py`` compute it; the tensor maths is :mod:`losses.cgc`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from gcmodels.gradcam import MODES as CAM_MODES
from gcmodels.gradcam import gradcam
from gcmodels.networks import ExplainableNet
from gcmodels.options import ConfigError, Options
from losses import classification_loss
from losses.cgc import consistency_term

from .base import OBJECTIVES, Objective, TrainingStep


class CGCOptions(Options):
    """Classification loss on three views + ``lambda`` x the contrastive term (conf/loss/cgc.yaml
    says what each option does)."""

    lam: Annotated[float, Field(alias="lambda", ge=0)]
    temperature: Annotated[float, Field(gt=0)]
    # The class both maps explain: the network's prediction on the view (the authors') or the label.
    target: Literal["prediction", "label"]
    # InfoNCE with in-batch negatives, or the authors' ablation: the mean squared difference.
    contrast: bool
    cam_mode: Literal[CAM_MODES]


@dataclass
class CGCOutput:
    loss: torch.Tensor
    classification_loss: torch.Tensor
    consistency_loss: torch.Tensor
    logits: torch.Tensor


def cgc_objective(net: ExplainableNet, batch: dict, lam: float, temperature: float, target: str = "prediction",
                  contrast: bool = True, cam_mode: str = "elementwise") -> CGCOutput:
    """``CE(f(image)) + CE(f(view)) + CE(f(augmented)) + lam * term`` for one batch of
    :class:`datamodules.views.ContrastiveViews` samples, ``term`` being
    :func:`losses.cgc.consistency_term` of the Grad-CAM maps of the view and of its augmented view,
    both for the class ``target`` names, taken with ``create_graph=True`` (the caller's one
    ``backward()`` runs the second-order backward) and upsampled bilinearly to the input side.
    Each view goes forward on its own, as in the authors' code (batch-norm statistics per view);
    the logits returned are the training augmentation's."""
    images, views, augmented, targets = batch["image"], batch["view"], batch["augmented"], batch["target"]
    logits = net(images)
    view_logits, view_maps = gradcam(net, views, targets if target == "label" else None, cam_mode,
                                     create_graph=True, normalize=False)
    classes = targets if target == "label" else view_logits.detach().argmax(1)
    aug_logits, aug_maps = gradcam(net, augmented, classes, cam_mode, create_graph=True, normalize=False)
    size = views.shape[-1]
    view_maps, aug_maps = (F.interpolate(maps[:, None], size=(size, size), mode="bilinear")[:, 0]
                           for maps in (view_maps, aug_maps))
    term = consistency_term(view_maps, aug_maps, batch["box"], batch["flip"], temperature, contrast)
    classification = sum(classification_loss(out, targets) for out in (logits, view_logits, aug_logits))
    return CGCOutput(classification + lam * term, classification, term, logits)


@OBJECTIVES.register("cgc", CGCOptions)
class CGCObjective(Objective):
    """:func:`cgc_objective` on each process's batch: the negatives of a sample are the other
    samples of its process's batch (the authors' per-GPU chunks under DataParallel)."""

    title = "CGC"

    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "target", "view", "augmented", "box", "flip")

    def setup(self, datamodule, seed: int) -> None:
        datamodule.set_train_views(True)

    def check_data(self, datamodule, model: dict, world_size: int) -> None:
        if datamodule.multilabel:
            # Which of several labels both maps should explain, and whether another image that
            # shares it is a negative, is a choice the authors never made: refused, not guessed.
            raise ConfigError([("loss.name", (
                f"loss=cgc explains one class per image and data.name={datamodule.name} is multi-label; "
                "train it on single-label data (synthetic, imagenet)"))])
        if self.options["contrast"] and datamodule.batch_size < 2:
            raise ConfigError([("data.batch_size", (
                f"{datamodule.global_batch_size} gives {datamodule.batch_size} image to each of {world_size} "
                f"process(es), and loss=cgc contrasts each image's map with the other images of its process's "
                f"batch: give data.batch_size >= {2 * world_size} or loss.contrast=false"))])

    def step(self, module, batch: dict) -> TrainingStep:
        options = self.options
        out = cgc_objective(module.net, batch, float(options["lambda"]), options["temperature"], options["target"],
                            options["contrast"], options["cam_mode"])
        return TrainingStep(out.loss, out.logits, {"train/ce": out.classification_loss,
                                                    "train/cgc": out.consistency_loss})
