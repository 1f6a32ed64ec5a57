"""Differentiable Grad-CAM (Selvaraju et al.; element-wise variant of Pillai & Pirsiavash, Eq. 3).

Written here rather than taken from Captum or pytorch-grad-cam because the GC loss must
differentiate *through* the map: the gradient ``dy/dA`` is taken with ``create_graph=True`` and
the whole map stays in the autograd graph (second-order backward). It is taken out of place with
``torch.autograd.grad`` so that DDP's gradient hooks only see the final ordinary ``backward()``.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from gcmodels.networks import second_order_graph

MODES = ("elementwise", "standard")


def gradcam_from_activations(
    activations: torch.Tensor,
    scores: torch.Tensor,
    mode: str = "elementwise",
    create_graph: bool = False,
    normalize: bool = True,
    eps: float = 1e-8,
    retain_graph: bool = False,
    grid: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps ``[B, h, w]`` of ``scores[b]`` (one logit per sample) at ``activations[B, C, h, w]``.

    ``mode="standard"``: ``relu(sum_k mean_ij(dy/dA_kij) A_k)`` (Eq. 1-2);
    ``mode="elementwise"``: ``relu(sum_k dy/dA_kij * A_kij)`` (Eq. 3).
    ``normalize``: divide each map by its L1 norm plus ``eps`` so it sums to 1.

    Requires that ``scores[b]`` depends on ``activations[b]`` only (true for every head here:
    pooling and fully connected layers, no batch statistics), so one gradient of the sum gives
    every sample's own gradient. ``retain_graph``: keep the graph for another gradient of the same
    activations (implied by ``create_graph``). ``grid``: lays the activations and their gradient
    out as ``[B, C, h, w]`` where the layer has another layout (a transformer's tokens:
    :meth:`gcmodels.networks.ExplainableNet.to_grid`).
    """
    if mode not in MODES:
        raise ValueError(f"Grad-CAM mode {mode!r} is unknown; allowed: {list(MODES)}")
    if scores.shape != activations.shape[:1]:
        raise ValueError(
            f"need one score per sample: scores {tuple(scores.shape)} vs activations "
            f"{tuple(activations.shape)}"
        )
    (grads,) = torch.autograd.grad(scores.sum(), activations, create_graph=create_graph,
                                   retain_graph=create_graph or retain_graph)
    if grid is not None:
        grads, activations = grid(grads), grid(activations)
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
    classes: torch.Tensor | None,
    mode: str = "elementwise",
    create_graph: bool = False,
    normalize: bool = True,
    owners: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, K]`` of ``images`` and Grad-CAM maps ``[R, h, w]`` of ``net`` (an
    ``ExplainableNet``) at the output of ``net.features``, map ``r`` for class ``classes[r]`` of image
    ``owners[r]`` (None: image ``r``); ``classes`` None: each image's top-scoring class. Works
    under ``torch.no_grad`` callers too (it enables gradients locally), which validation and
    evaluation need.

    Each image goes forward once, however many maps it has (``loss.composites=shared``). A gradient
    of a sum of scores separates the images but not two classes of one image, so the maps are taken
    in rounds, one gradient each, every image at most once per round: as many rounds as the most
    maps any image has."""
    grid = partial(net.to_grid, image_size=tuple(images.shape[-2:]))
    with torch.enable_grad(), second_order_graph(create_graph):
        activations = net.forward_features(images)
        if not activations.requires_grad:
            # Frozen weights and plain images: Grad-CAM still needs dy/dA.
            activations = activations.detach().requires_grad_(True)
        logits = net.head(activations)
        if classes is None:
            classes = logits.detach().argmax(1)
        if owners is None:
            # One map per image: a single gradient, and no round bookkeeping (whose rounds.max()
            # would wait for the GPU) on every training step and explanation.
            scores = logits.gather(1, classes.view(-1, 1)).squeeze(1)
            return logits, gradcam_from_activations(activations, scores, mode, create_graph, normalize, grid=grid)
        order = owners.argsort(stable=True)
        first = torch.searchsorted(owners[order], owners[order])
        rounds = torch.empty_like(owners)
        rounds[order] = torch.arange(owners.shape[0], device=owners.device) - first
        rows, maps = [], []
        last = int(rounds.max())
        for index in range(last + 1):
            members = (rounds == index).nonzero().flatten()
            own = owners[members]
            scores = logits.new_zeros(images.shape[0]).index_put((own,), logits[own, classes[members]])
            maps.append(gradcam_from_activations(activations, scores, mode, create_graph, normalize,
                                                 retain_graph=index < last, grid=grid)[own])
            rows.append(members)
        maps = torch.cat(maps)[torch.cat(rows).argsort()]
    return logits, maps
