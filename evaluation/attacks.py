"""Adversarial attacks used to measure robustness (paper Table 6): FGSM in pixel space.

Every ``eps`` here is in units of 1/255 of pixel intensity (``eps=8`` means 8/255), the unit of the
configs and reports, so no interface converts.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from losses import classification_loss

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fgsm(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float,
         loss: str | Loss = "ce") -> torch.Tensor:
    """FGSM adversarial images: ``clip(x + eps/255 * sign(grad_x loss(net(x), y)), 0, 1)``.

    ``images`` in pixel space [0, 1], ``eps`` in 1/255 units. ``loss="ce"`` is the project's
    classification loss: cross-entropy for class indices ``[B]``, BCE with logits for multi-hot
    targets ``[B, K]``; a callable ``loss(logits, targets) -> scalar`` replaces it.
    Only the input's gradient is taken (``torch.autograd.grad``), so the parameters' ``.grad``
    stay untouched; it works under ``torch.no_grad()``. Put ``net`` in eval mode first: in train
    mode batch norm would mix the images and update its running statistics."""
    return next(fgsm_attacks(net, images, targets, [eps], loss))


def fgsm_attacks(net: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, eps_list: Sequence[float],
                 loss: str | Loss = "ce") -> Iterator[torch.Tensor]:
    """:func:`fgsm`'s adversarial images for each eps of ``eps_list`` (1/255 units) in turn, from
    one gradient: the attack's direction does not depend on eps, so every eps after the first costs
    no pass through ``net``. The gradient is taken at the first ``next()``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("fgsm needs gradients, which inference mode forbids: run with inference_mode=False")
    if loss == "ce":
        loss = classification_loss
    elif not callable(loss):
        raise ValueError(f"loss must be 'ce' or a callable, got {loss!r}")
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        # classification_loss averages over the batch: a positive factor, so the signs are unchanged.
        (gradient,) = torch.autograd.grad(loss(net(inputs), targets), inputs)
    direction = gradient.sign()
    for eps in eps_list:
        yield (images.detach() + eps / 255 * direction).clamp(0, 1)
