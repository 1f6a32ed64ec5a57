"""Input-gradient methods, provided by Captum: Gradient, SmoothGrad and Integrated Gradients."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import NoiseTunnel, Saliency
from pydantic import Field
from torch import Tensor

from evaluation.explainers.base import EXPLAINERS, Explainer, images_per_pass, input_leaf


@EXPLAINERS.register("gradient")
@dataclass
class Gradient(Explainer):
    """Gradient saliency (Simonyan et al.): ``max_c |dy_t / dx_c|`` (Captum ``Saliency``)."""

    def explain(self, net, images, targets):
        grads = Saliency(net).attribute(input_leaf(images), target=targets, abs=True)
        return grads.amax(dim=1)


@EXPLAINERS.register("smoothgrad")
@dataclass
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al.): mean of ``|dy_t/dx|`` over ``num_samples`` noisy copies
    ``x + N(0, stdev^2)``, then max over channels (Captum ``NoiseTunnel(Saliency)``).

    ``stdev`` is in pixel units; images span [0, 1], so it is also the paper's noise level
    ``sigma / (x_max - x_min)``. The noise comes from torch's global RNG (Captum takes no
    generator): with ``seed=None`` set ``torch.manual_seed`` for reproducible maps; with an integer
    ``seed`` every call draws the same noise from a forked RNG and leaves the global one alone.
    ``samples_per_pass`` caps how many noisy copies of the batch go through the net at once;
    by default as many as keep a pass near 64 images of 224 px (one copy at least). The method's
    values have no default here: they live in ``conf/explainer/smoothgrad.yaml``.
    """

    num_samples: Annotated[int, Field(ge=1)]
    stdev: Annotated[float, Field(ge=0)]
    # torch.manual_seed refuses negatives.
    seed: Annotated[int, Field(ge=0)] | None
    samples_per_pass: Annotated[int, Field(ge=1)] | None = None

    def explain(self, net, images, targets):
        if self.seed is None:
            return self._smoothgrad(net, images, targets)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self._smoothgrad(net, images, targets)

    def _smoothgrad(self, net, images, targets):
        grads = NoiseTunnel(Saliency(net)).attribute(
            input_leaf(images), nt_type="smoothgrad", nt_samples=self.num_samples,
            nt_samples_batch_size=self.samples_per_pass or max(1, images_per_pass(images) // len(images)),
            stdevs=float(self.stdev),
            target=targets, abs=True,
        )
        return grads.amax(dim=1)


@EXPLAINERS.register("integrated_gradients")
@dataclass
class IntegratedGradients(Explainer):
    """Integrated Gradients (Sundararajan et al.), Captum, Gauss-Legendre rule with ``steps``
    points, from ``baseline`` (a number or a tensor broadcastable to the images; 0 = a black image
    in pixel space).

    Map: ``|sum_c attr_c|``. The channel sum is the pixel's attribution (IG attributions are
    additive, and summing first keeps completeness per pixel); the absolute value then scores
    evidence for and against the class alike, as the other gradient maps do.

    ``internal_batch_size`` (Captum's): how many (step, image) pairs go through the net at once;
    by default as many as keep a pass near 64 images of 224 px, and never fewer than the batch
    (Captum's own floor: one step of every image). ``steps`` has no default here: it lives in
    ``conf/explainer/integrated_gradients.yaml``.
    """

    steps: Annotated[int, Field(ge=1)]
    baseline: float | Tensor = field(default=0.0, metadata={"option": False})
    internal_batch_size: Annotated[int, Field(ge=1)] | None = None

    def attributions(self, net, images, targets) -> tuple[Tensor, Tensor]:
        """Per-channel attributions ``[B, C, H, W]`` and Captum's convergence delta ``[B]``
        (``sum(attr) - (y_t(x) - y_t(baseline))``; near 0 when the integral is accurate)."""
        with torch.enable_grad():
            attr, delta = CaptumIntegratedGradients(net).attribute(
                input_leaf(images), baselines=self.baseline, target=targets.long(),
                n_steps=self.steps,
                internal_batch_size=self.internal_batch_size or max(len(images), images_per_pass(images)),
                return_convergence_delta=True,
            )
        return attr.detach(), delta.detach()

    def explain(self, net, images, targets):
        return self.attributions(net, images, targets)[0].sum(dim=1).abs()
