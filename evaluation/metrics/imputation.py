"""Noisy linear imputation (ROAD; Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022): each removed pixel becomes the weighted mean of its 8
neighbours (direct ones weight 1/6, diagonal ones 1/12; at the border, of those inside the
image), removed neighbours included, so the removed pixels of an image and channel solve one
sparse linear system; then noise of standard deviation ``noise`` is added to them.

The system, for the removed pixels ``R`` of one image and channel with kept values ``v``::

    deg_i x_i - sum_{j in R} w_ij x_j = sum_{j not in R} w_ij v_j      (i in R)

``deg_i`` the weight of ``i``'s neighbours inside the image. It is symmetric and positive
definite whenever some pixel is kept (every group of removed pixels borders a kept one). Two
solvers, chosen by the images' device (measured on 32 images with a removed disc of 10-90% of
the pixels, 2 CPU cores):

- ``direct`` (CPU): ROAD's own way, scipy's sparse LU of each image's matrix (assembled here with
  numpy in one pass, not entry by entry), solved for the three channels at once: about 5 ms an
  image at 80 px and 0.3 s at 224 px;
- ``cg`` (GPU): the whole batch at once on the device by conjugate gradients preconditioned by
  ``deg``, the matrix applied as a 3 x 3 convolution (no library solves a batch of these systems
  on a GPU); on the CPU it takes 20-100 ms an image at 80 px (70-230 iterations), hence the
  direct solver there. It stops at a relative residual of :data:`TOLERANCE` (pixel errors below
  2e-4 in float32, against ROAD's noise of 0.01) and raises rather than return a half-solved
  image.

Both equal a direct solve of the system built entry by entry (``tests/test_faithfulness.py``).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

# Relative residual ||b - A x|| / ||b|| at which the solve stops, by the dtype it runs in.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _neighbour_sums(values: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]``: each pixel's weighted sum of its neighbours' values (outside the image:
    nothing)."""
    direct, diagonal = 1 / 6, 1 / 12
    kernel = values.new_tensor([[diagonal, direct, diagonal], [direct, 0.0, direct], [diagonal, direct, diagonal]])
    channels = values.shape[1]
    return F.conv2d(values, kernel.expand(channels, 1, 3, 3), padding=1, groups=channels)


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One inner product per image and channel, ``[N, C, 1, 1]``."""
    return (a * b).sum((2, 3), keepdim=True)


SOLVERS = ("direct", "cg")
# The 8 neighbours' offsets and weights.
_NEIGHBOURS = [(dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def linear_imputation(images: torch.Tensor, removed: torch.Tensor, solver: str | None = None,
                      max_iterations: int | None = None) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` with the pixels of bool ``removed`` ``[N, H, W]`` replaced by the
    solution of the system above (no noise), in the images' dtype. ``solver``: ``direct`` or
    ``cg`` (None: direct on the CPU, cg elsewhere). For ``cg``, ``max_iterations`` (default
    ``4 * (H + W) + 100``; it needs about the diameter of the largest removed region) bounds the
    solve; not reaching :data:`TOLERANCE` raises."""
    if images.dim() != 4 or removed.shape != (images.shape[0], *images.shape[2:]) or removed.dtype != torch.bool:
        raise ValueError(f"images must be [N, C, H, W] and removed bool [N, H, W] of the same N, H, W; got "
                         f"{tuple(images.shape)} and {removed.dtype} {tuple(removed.shape)}")
    if removed.flatten(1).all(1).any():
        raise ValueError("noisy linear imputation needs a kept pixel in every image: a removed share of 100% "
                         "leaves nothing to impute from")
    solver = solver or ("direct" if images.device.type == "cpu" else "cg")
    if solver == "direct":
        return _direct(images, removed)
    if solver != "cg":
        raise ValueError(f"unknown solver {solver!r}; known: {list(SOLVERS)}")
    height, width = images.shape[-2:]
    dtype = torch.promote_types(images.dtype, torch.float32)
    values = images.to(dtype)
    inside = removed.unsqueeze(1).to(dtype).expand_as(values)
    degree = _neighbour_sums(torch.ones_like(values[:1, :1])).expand_as(values)

    def system(x: torch.Tensor) -> torch.Tensor:
        return (degree * x - _neighbour_sums(x)) * inside

    right = _neighbour_sums(values * (1 - inside)) * inside
    solution = right / degree  # each removed pixel the mean of its kept neighbours: a first guess
    residual = right - system(solution)
    preconditioned = residual / degree
    direction = preconditioned
    product = _batch_dot(residual, preconditioned)
    tiny = torch.finfo(dtype).tiny
    scale = right.flatten(2).norm(dim=2)[..., None, None].clamp_min(tiny)
    tolerance = TOLERANCE[dtype]
    limit = max_iterations if max_iterations is not None else 4 * (height + width) + 100
    for iteration in range(limit + 1):
        worst = float((residual.flatten(2).norm(dim=2)[..., None, None] / scale).max())
        if worst <= tolerance:
            break
        if iteration == limit:
            raise RuntimeError(f"noisy linear imputation did not converge in {limit} iterations on {height}x{width} "
                               f"images (relative residual {worst:.2e} > {tolerance:.0e})")
        applied = system(direction)
        curvature = _batch_dot(direction, applied)
        # A system already solved (nothing removed, or converged) has zero curvature: left alone.
        step = torch.where(curvature > 0, product / curvature.clamp_min(tiny), 0.0)
        solution = solution + step * direction
        residual = residual - step * applied
        preconditioned = residual / degree
        updated = _batch_dot(residual, preconditioned)
        direction = preconditioned + torch.where(product > 0, updated / product.clamp_min(tiny), 0.0) * direction
        product = updated
    return torch.where(inside > 0, solution, values).to(images.dtype)


def _direct(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The system of each image built with numpy and solved by scipy's sparse LU, in float64."""
    height, width = images.shape[-2:]
    filled = images.detach().cpu().double().numpy().copy()
    for image, holes in zip(filled, removed.cpu().numpy()):
        rows, cols = np.nonzero(holes)
        if not len(rows):
            continue
        number = np.full((height, width), -1)
        number[rows, cols] = np.arange(len(rows))
        degree = np.zeros(len(rows))
        right = np.zeros((len(rows), image.shape[0]))
        entries, columns, weights = [], [], []
        for dy, dx, weight in _NEIGHBOURS:
            y, x = rows + dy, cols + dx
            inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            degree[inside] += weight
            neighbour = np.full(len(rows), -1)
            neighbour[inside] = number[y[inside], x[inside]]
            unknown = neighbour >= 0
            entries.append(np.nonzero(unknown)[0])
            columns.append(neighbour[unknown])
            weights.append(np.full(int(unknown.sum()), -weight))
            kept = inside & ~unknown
            right[kept] += weight * image[:, y[kept], x[kept]].T
        diagonal = np.arange(len(rows))
        matrix = scipy.sparse.csc_matrix((np.concatenate([*weights, degree]),
                                          (np.concatenate([*entries, diagonal]), np.concatenate([*columns, diagonal]))),
                                         shape=(len(rows), len(rows)))
        image[:, rows, cols] = scipy.sparse.linalg.splu(matrix).solve(right).T
    return torch.from_numpy(filled).to(images)


def noisy_linear_imputation(images: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ROAD's imputation: :func:`linear_imputation`, plus ``noise`` (``[N, C, H, W]``, already
    scaled: ROAD draws normal noise of standard deviation 0.01) on the removed pixels only."""
    imputed = linear_imputation(images, removed)
    return imputed + noise.to(imputed) * removed.unsqueeze(1)
