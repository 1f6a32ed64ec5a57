"""Differentiable Grad-CAM (Selvaraju et al.; element-wise variant of Pillai & Pirsiavash, Eq. 3).

Written here rather than taken from Captum or pytorch-grad-cam because the GC loss must
differentiate *through* the map: the gradient ``dy/dA`` is taken with ``create_graph=True`` and
the whole map stays in the autograd graph (second-order backward). It is taken out of place with
``torch.autograd.grad`` so that DDP's gradient hooks only see the final ordinary ``backward()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("elementwise", "standard")


def gradcam_from_activations(
    activations: torch.Tensor,
    scores: torch.Tensor,
    mode: str = "elementwise",
    create_graph: bool = False,
    normalize: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Grad-CAM maps ``[B, h, w]`` of ``scores[b]`` (one logit per sample) at ``activations[B, C, h, w]``.

    ``mode="standard"``: ``relu(sum_k mean_ij(dy/dA_kij) A_k)`` (Eq. 1-2);
    ``mode="elementwise"``: ``relu(sum_k dy/dA_kij * A_kij)`` (Eq. 3).
    ``normalize``: divide each map by its L1 norm plus ``eps`` so it sums to 1.

    Requires that ``scores[b]`` depends on ``activations[b]`` only (true for every head here:
    pooling and fully connected layers, no batch statistics), so one gradient of the sum gives
    every sample's own gradient.
    """
    if mode not in MODES:
        raise ValueError(f"Grad-CAM mode {mode!r} is unknown; allowed: {list(MODES)}")
    if scores.shape != activations.shape[:1]:
        raise ValueError(
            f"need one score per sample: scores {tuple(scores.shape)} vs activations "
            f"{tuple(activations.shape)}"
        )
    (grads,) = torch.autograd.grad(scores.sum(), activations, create_graph=create_graph)
    # Maps in float32 even under mixed precision: the eps of the normalisation vanishes in fp16.
    dtype = torch.promote_types(activations.dtype, torch.float32)
    grads, activations = grads.to(dtype), activations.to(dtype)
    if mode == "standard":
        grads = grads.mean(dim=(2, 3), keepdim=True)
    maps = F.relu((grads * activations).sum(dim=1))
    if normalize:
        maps = maps / (maps.sum(dim=(1, 2), keepdim=True) + eps)
    return maps


def gradcam(
    net,
    images: torch.Tensor,
    classes: torch.Tensor,
    mode: str = "elementwise",
    create_graph: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, K]`` and Grad-CAM maps ``[B, h, w]`` of ``net`` (an ``ExplainableNet``) for
    ``classes[B]`` at the output of ``net.features``. Works under ``torch.no_grad`` callers too
    (it enables gradients locally), which validation and evaluation need."""
    with torch.enable_grad():
        activations = net.forward_features(images)
        if not activations.requires_grad:
            # Frozen weights and plain images: Grad-CAM still needs dy/dA.
            activations = activations.detach().requires_grad_(True)
        logits = net.head(activations)
        scores = logits.gather(1, classes.view(-1, 1)).squeeze(1)
        maps = gradcam_from_activations(activations, scores, mode, create_graph, normalize)
    return logits, maps
