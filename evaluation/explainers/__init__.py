"""Explainers scored by the evaluation: ``explainer(net, images, targets) -> heatmaps [B, h, w]``.

``images``: float pixel-space batch ``[B, 3, H, W]`` in [0, 1]; ``targets``: class indices, long
``[B]``. Heatmaps are detached, on the images' device, at the method's own resolution (Grad-CAM and
c-MWP: the explained layer's ``h x w``; the others: ``H x W``); the metrics upsample and normalise
them. Every explainer enables gradients locally, so it works inside ``torch.no_grad()`` (validation,
testing), and differentiates only with respect to inputs or activations
(``torch.autograd.grad``), so it leaves no ``.grad`` in the network's parameters.

Explainers use the network as it is: call ``net.eval()`` first. FullGrad and c-MWP treat batch
norm as a fixed affine map and refuse a network whose batch norm (or, for c-MWP, dropout) is in
training mode.
"""
from __future__ import annotations

from evaluation.explainers.base import EXPLAINERS, Explainer, check_explainer
from evaluation.explainers.excitation import SIGNALS, ContrastiveExcitationBackprop
from evaluation.explainers.fullgrad import FullGrad
from evaluation.explainers.gradcam import GradCAM
from evaluation.explainers.gradients import Gradient, IntegratedGradients, SmoothGrad
from evaluation.explainers.lime import Lime

__all__ = [
    "EXPLAINERS", "SIGNALS", "ContrastiveExcitationBackprop", "Explainer", "FullGrad", "GradCAM",
    "Gradient", "IntegratedGradients", "Lime", "SmoothGrad", "build_explainer",
    "check_explainer",
]


def build_explainer(name: str, **options) -> Explainer:
    """The explainer called ``name`` (``explainer.name``) with its options (validated by the
    entry point's schema) as keywords."""
    return EXPLAINERS[name].build(**options)
