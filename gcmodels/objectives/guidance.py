"""``loss=energy|l1|rrr|ppce``: classification loss + lambda x a loss that guides each training
image's explanation towards its object's mask (Rao et al., "Studying How to Efficiently and
Effectively Guide Models with Explanations", ICCV 2023; the authors' ``train.py`` and
``losses.py``); the tensor maths is :mod:`losses.guidance`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from gcmodels.gradcam import MODES as CAM_MODES
from gcmodels.gradcam import gradcam
from gcmodels.networks import ExplainableNet, second_order_graph
from gcmodels.options import ConfigError, Options
from losses import classification_loss
from losses.guidance import guidance_terms

from .base import OBJECTIVES, Objective, TrainingStep


class GuidanceOptions(Options):
    """Classification loss + ``lambda`` x a guidance loss (conf/loss/energy.yaml says what each
    option does; l1, rrr and ppce take the same)."""

    lam: Annotated[float, Field(alias="lambda", ge=0)]
    # Grad-CAM at the explained layer, upsampled to the input (the authors' "Final" layer), or
    # input x gradient at the network's (normalised) input.
    attribution: Literal["gradcam", "input_x_gradient"]
    # Grad-CAM's variant: standard (the authors') or elementwise (Eq. 3 of the GC paper).
    cam_mode: Literal[CAM_MODES]
    annotated_fraction: Annotated[float, Field(ge=0, le=1)]
    mask_dilation: Annotated[float, Field(ge=0)]


def input_x_gradient(net: ExplainableNet, images: torch.Tensor, classes: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and ``sum_c x * dy/dx`` ``[B, H, W]`` at the network's normalised input ``x``, with
    ``create_graph=True``."""
    normalized = net.normalize(images)
    if not normalized.requires_grad:
        normalized = normalized.detach().requires_grad_(True)
    with second_order_graph():
        logits = net.head(net.features(normalized))
    scores = logits.gather(1, classes.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(scores, normalized, create_graph=True)
    return logits, (grads * normalized).sum(dim=1)


@dataclass
class GuidanceOutput:
    loss: torch.Tensor
    classification_loss: torch.Tensor
    guidance_loss: torch.Tensor
    logits: torch.Tensor


def guidance_objective(net: ExplainableNet, batch: dict, name: str, lam: float, attribution: str = "gradcam",
                       cam_mode: str = "standard") -> GuidanceOutput:
    """``classification(f(image)) + lam * mean_i(annotated_i * term_i)`` for one batch of
    :class:`datamodules.guidance.GuidedSamples`: ``term_i`` is guidance loss ``name``
    (:func:`losses.guidance.guidance_terms`) of image ``i``'s attribution for its
    ``guide_class`` against its ``mask``; the attribution keeps its graph, so the caller's one
    ``backward()`` runs the second-order backward.

    The mean runs over all the batch's images, those without a mask adding 0: the authors sum
    the term over the annotated images of a batch, so their lambda is ours divided by the
    (per-process) batch size, and ours stays the same for any batch and number of processes."""
    images, masks, classes = batch["image"], batch["mask"], batch["guide_class"]
    if attribution == "gradcam":
        logits, maps = gradcam(net, images, classes, cam_mode, create_graph=True, normalize=False)
    else:
        logits, maps = input_x_gradient(net, images, classes)
    terms = guidance_terms(name, maps, masks)
    guidance = (terms * batch["annotated"]).mean()
    classification = classification_loss(logits, batch["target"])
    return GuidanceOutput(classification + lam * guidance, classification, guidance, logits)


class GuidanceObjective(Objective):
    """:func:`guidance_objective` with the guidance loss of the registered name."""

    loss_name: str

    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "target", "mask", "guide_class", "annotated")

    def setup(self, datamodule, seed: int) -> None:
        datamodule.set_train_masks(self.options["annotated_fraction"], self.options["mask_dilation"], seed)

    def check_data(self, datamodule, model: dict, world_size: int) -> None:
        if datamodule.guidance_masks is None:
            # Here, not at the top: the objectives stay importable without Lightning, which the
            # datamodules need (tests/test_layers.py).
            from datamodules import DATASETS

            with_masks = [name for name, entry in DATASETS.entries.items() if entry.target.guidance_masks]
            raise ConfigError([("loss.name", (
                f"loss={self.loss_name} guides each training image's explanation with its object's mask, and "
                f"data.name={datamodule.name} gives no masks or boxes of its training images here; use data "
                f"that does ({', '.join(with_masks)})"))])

    def step(self, module, batch: dict) -> TrainingStep:
        options = self.options
        out = guidance_objective(module.net, batch, self.loss_name, float(options["lambda"]), options["attribution"],
                                 options["cam_mode"])
        guided = batch["annotated"].float().mean()
        return TrainingStep(out.loss, out.logits, {"train/ce": out.classification_loss,
                                                    f"train/{self.loss_name}": out.guidance_loss},
                            means={"train/guided": guided})


@OBJECTIVES.register("energy", GuidanceOptions)
class EnergyGuidance(GuidanceObjective):
    loss_name, title = "energy", "Energy"


@OBJECTIVES.register("l1", GuidanceOptions)
class L1Guidance(GuidanceObjective):
    loss_name, title = "l1", "L1"


@OBJECTIVES.register("rrr", GuidanceOptions)
class RRRGuidance(GuidanceObjective):
    loss_name, title = "rrr", "RRR"


@OBJECTIVES.register("ppce", GuidanceOptions)
class PPCEGuidance(GuidanceObjective):
    loss_name, title = "ppce", "PPCE"
