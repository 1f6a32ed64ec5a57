"""Reference maps that any explanation should beat, scored on the same trials as the explainer: a
centred peak (TorchRay's "center" baseline: objects often sit near the middle of the image) and
uniform noise (the chance level). A localisation number means something only beside them."""
from __future__ import annotations

import torch

from evaluation.metrics.functional import trial_seeds, trial_uniforms

REFERENCES = ("center", "noise")


def centre_maps(count: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[count, H, W]`` isotropic Gaussians centred on the image, standard deviation a quarter of
    the shorter side: the maximum is the centre pixel (for an even side, the first of the middle
    ones, PG's tie rule), and the mass spreads over the middle of the image for SPG and CH."""
    rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    spread = min(height, width) / 4
    squared = rows.view(-1, 1) ** 2 + cols.view(1, -1) ** 2
    return torch.exp(-0.5 * squared / spread**2).expand(count, height, width)


def map_seeds(trials: torch.Tensor, number: int) -> torch.Tensor:
    """Seeds ``[B, 2]`` of the maps numbered ``number`` of the trials ``trials`` (long ``[B]``, each
    trial's index): 0 the explainer's (and the centred peak's), 1.. the noise maps; rows of one
    width (:func:`evaluation.metrics.functional.trial_uniforms`). The evaluation engine and the
    consensus script seed alike through it."""
    return torch.stack([trials, torch.full_like(trials, number)], 1)


def trial_noise_maps(seed: int, trials: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[B, H, W]`` uniform noise in [0, 1), map ``b`` drawn on the CPU from a generator seeded by
    ``(seed, trials[b])`` alone (``trials``: non-negative integers ``[B]`` or ``[B, k]`` that
    identify the maps; :func:`evaluation.metrics.functional.trial_uniforms`): the same map for a
    trial whatever its batch, its process or the device."""
    return trial_uniforms("noise", trial_seeds(seed, trials), (height, width), torch.float32).to(device)
