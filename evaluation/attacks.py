"""Adversarial attacks used to measure robustness (paper Table 6): FGSM.

Every ``eps`` here is in units of 1/255 (``eps=8`` means 8/255), the unit of the configs and
reports, so no interface converts. ``space`` says what the step is measured in: ``"pixel"`` (the
default) moves each pixel intensity by ``eps/255``; ``"normalized"`` moves the network's normalised
input ``(x - mean) / std`` by ``eps/255``, which in pixels is ``eps/255 * std`` per channel (about
4.4x smaller with ImageNet's std; the paper's Table 6 magnitudes suggest this space). Adversarial
images are clipped to [0, 1] in both.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from losses import classification_loss

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SPACES = ("pixel", "normalized")


def step_scale(net: torch.nn.Module, space: str) -> torch.Tensor | float:
    """Pixel change per unit of eps/255 in ``space``: 1, or the network's per-channel std."""
    if space == "pixel":
        return 1.0
    if space != "normalized":
        raise ValueError(f"FGSM space {space!r} is unknown; allowed: {list(SPACES)}")
    std = getattr(getattr(net, "normalize", None), "std", None)
    if not torch.is_tensor(std):
        raise ValueError(f"FGSM in normalized space needs a network with a Normalize first step "
                         f"(net.normalize.std); {type(net).__name__} has none")
    return std


def fgsm(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float,
         loss: str | Loss = "ce", space: str = "pixel") -> torch.Tensor:
    """FGSM adversarial images: ``clip(x + eps/255 * s * sign(grad_x loss(net(x), y)), 0, 1)``,
    ``s`` = :func:`step_scale` (1 in pixel space).

    ``images`` in pixel space [0, 1], ``eps`` in 1/255 units. ``loss="ce"`` is the project's
    classification loss: cross-entropy for class indices ``[B]``, BCE with logits for multi-hot
    targets ``[B, K]``; a callable ``loss(logits, targets) -> scalar`` replaces it.
    Only the input's gradient is taken (``torch.autograd.grad``), so the parameters' ``.grad``
    stay untouched; it works under ``torch.no_grad()``. Put ``net`` in eval mode first: in train
    mode batch norm would mix the images and update its running statistics."""
    return next(fgsm_attacks(net, images, targets, [eps], loss, space))


def fgsm_attacks(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, eps_list: Sequence[float],
                 loss: str | Loss = "ce", space: str = "pixel") -> Iterator[torch.Tensor]:
    """:func:`fgsm`'s adversarial images for each eps of ``eps_list`` (1/255 units) in turn, from
    one gradient: the attack's direction does not depend on eps, so every eps after the first costs
    no pass through ``net``. The gradient is taken at the first ``next()``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("fgsm needs gradients, which inference mode forbids: run with inference_mode=False")
    if loss == "ce":
        loss = classification_loss
    elif not callable(loss):
        raise ValueError(f"loss must be 'ce' or a callable, got {loss!r}")
    scale = step_scale(net, space)
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        # classification_loss averages over the batch: a positive factor, so the signs are unchanged.
        (gradient,) = torch.autograd.grad(loss(net(inputs), targets), inputs)
    direction = gradient.sign() * scale
    for eps in eps_list:
        yield (images.detach() + eps / 255 * direction).clamp(0, 1)
