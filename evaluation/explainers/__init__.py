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

from functools import partial
from pathlib import Path
from typing import Callable, Mapping

from omegaconf import OmegaConf

from evaluation.explainers.base import Explainer, check_explainer
from evaluation.explainers.excitation import SIGNALS, ContrastiveExcitationBackprop
from evaluation.explainers.fullgrad import FullGrad
from evaluation.explainers.gradcam import GradCAM
from evaluation.explainers.gradients import Gradient, IntegratedGradients, SmoothGrad
from evaluation.explainers.lime import Lime

__all__ = [
    "EXPLAINERS", "SIGNALS", "ContrastiveExcitationBackprop", "Explainer", "FullGrad", "GradCAM",
    "Gradient", "IntegratedGradients", "explainer_options", "Lime", "SmoothGrad", "build_explainer",
    "check_explainer",
]

EXPLAINERS: dict[str, Callable[..., Explainer]] = {
    "gradcam": GradCAM,
    "gradcam_standard": partial(GradCAM, mode="standard"),
    "gradient": Gradient,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "fullgrad": FullGrad,
    "cmwp": ContrastiveExcitationBackprop,
    "lime": Lime,
}


CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf" / "explainer"


def explainer_options(spec: str | Mapping) -> dict:
    """An explainer's name and options: ``spec`` is a name (its options from
    ``conf/explainer/<name>.yaml``, where they are written once) or a mapping with ``name`` and
    options that replace those of the file."""
    overrides = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = overrides.get("name")
    path = CONFIG_DIR / f"{name}.yaml"
    if name not in EXPLAINERS or not path.is_file():
        raise ValueError(f"explainer {name!r} is unknown; valid explainers: {sorted(EXPLAINERS)}")
    return {**OmegaConf.to_container(OmegaConf.load(path), resolve=True), **overrides}


def build_explainer(name: str, **kwargs) -> Explainer:
    """The explainer called ``name`` (a key of ``EXPLAINERS``) with its options as keywords."""
    if name not in EXPLAINERS:
        raise ValueError(f"explainer {name!r} is unknown; valid explainers: {sorted(EXPLAINERS)}")
    return EXPLAINERS[name](**kwargs)
