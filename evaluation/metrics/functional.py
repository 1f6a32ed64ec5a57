"""Explanation-quality metrics as pure functions of batched tensors: localisation (paper section
4.3: PG, SPG, CH, NQH) and, at the end, faithfulness (insertion, deletion, ROAD; their own inputs
are described there) and the randomisation sanity check.

Localisation inputs: ``heatmaps`` float ``[B, H, W]``, finite and non-negative, already at the mask's size
(see :func:`upsample`); ``masks`` bool ``[B, H, W]``. Every score function returns one score per
image. An image that cannot be scored (all-zero heatmap, or empty mask where a mask is used;
:func:`valid_pairs`) gets NaN, never 0 or 1, so that callers skip and count it; the one exception
is :func:`pointing_game`, whose bool result cannot hold NaN (use :func:`pointing_hits`).

Tolerance (PG, SPG): a pixel ``p`` is a hit iff some mask pixel ``q`` has ``||p - q|| < tolerance``
(strict), i.e. ``p`` lies in the mask dilated by the disc of offsets ``dy^2 + dx^2 < tolerance^2``.
:func:`dilate_masks` builds that dilated mask for whole images. PG and SPG only need it at one
and at ``num_samples`` points per image, so they test those points directly against the same
disc (:func:`_hits_at`), row by row with prefix sums of the mask: one pass over the mask and
``O(points * tolerance)`` look-ups per image instead of ``O(H * W * tolerance)`` for dilating the
whole mask. Both are tested against a per-pixel distance computation.

Randomness (SPG's points, the uniform-noise reference maps) is drawn per trial: row ``b`` of
:func:`trial_uniforms` comes from a generator seeded by ``seeds[b]`` alone, so a trial's draws do
not depend on the batch it is in, on the process that scores it or on the order of the trials.

Bad input raises ``ValueError`` naming the shapes, dtypes or devices involved.
Scalar options (``tolerance`` > 0, ``num_samples`` >= 1) are taken as given: they come from
the evaluation settings, whose schema (:class:`evaluation.settings.EvaluationSettings`) checks them.
"""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.transforms.v2.functional import gaussian_blur

from evaluation.metrics.imputation import noisy_linear_imputation

__all__ = [
    "PERTURBATION_SCORES",
    "ROAD_ORDERS",
    "SIMILARITIES",
    "SUBSTRATES",
    "average_ranks",
    "class_scores",
    "content_heatmap",
    "curve_area",
    "deletion_auc",
    "dilate_masks",
    "insertion_auc",
    "map_similarity",
    "negative_quadrants_heatmap",
    "parameter_blocks",
    "perturbation_curves",
    "perturbation_steps",
    "pixel_ranks",
    "pointing_game",
    "pointing_hits",
    "randomisation_similarity",
    "randomise_block",
    "road",
    "road_removed",
    "spearman",
    "stochastic_pointing_game",
    "substrate",
    "trial_normals",
    "trial_seeds",
    "trial_uniforms",
    "uniform_where_zero",
    "upsample",
    "valid_pairs",
]


def _check_heatmaps(heatmaps: torch.Tensor) -> None:
    if heatmaps.dim() != 3 or not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be a float tensor [B, H, W], got {heatmaps.dtype} {tuple(heatmaps.shape)}")
    # One reduction for both checks: NaN propagates through aminmax, -inf fails ``low >= 0``.
    low, high = torch.aminmax(heatmaps) if heatmaps.numel() else (0, 0)
    if not (low >= 0 and high < math.inf):
        # Counted only here, on the way out: the common case pays for one reduction.
        raise ValueError(
            f"heatmaps {tuple(heatmaps.shape)} must be finite and non-negative (they are taken as distributions), "
            f"got {int(heatmaps.isnan().sum())} NaN, {int(heatmaps.isinf().sum())} inf and "
            f"{int((heatmaps < 0).sum())} negative values"
        )


def _check_same_device(heatmaps: torch.Tensor, name: str, other: torch.Tensor) -> None:
    if other.device != heatmaps.device:
        raise ValueError(f"{name} {tuple(other.shape)} are on {other.device}, the heatmaps "
                         f"{tuple(heatmaps.shape)} on {heatmaps.device}: put both on one device")


def _check_masks(heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
    if masks.dtype != torch.bool or masks.shape != heatmaps.shape:
        raise ValueError(
            f"masks must be bool with the heatmaps' shape {tuple(heatmaps.shape)}, "
            f"got {masks.dtype} {tuple(masks.shape)} (upsample the heatmaps to the mask size first)"
        )
    _check_same_device(heatmaps, "masks", masks)


def _is_integer(values: torch.Tensor) -> bool:
    return not (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool)


def _check_per_image(heatmaps: torch.Tensor, name: str, values: torch.Tensor, low: int, high: int) -> None:
    """``values``: one integer per heatmap, in ``low..high``, on the heatmaps' device."""
    if values.shape != heatmaps.shape[:1] or not _is_integer(values):
        raise ValueError(f"{name} must be integers [B] = [{heatmaps.shape[0]}] in {low}..{high}, one per heatmap "
                         f"of {tuple(heatmaps.shape)}, got {values.dtype} {tuple(values.shape)}")
    _check_same_device(heatmaps, name, values)
    if len(values) and (values.min() < low or values.max() > high):
        raise ValueError(f"{name} must be in {low}..{high}, got values from {int(values.min())} to {int(values.max())}")


def _check_seeds(heatmaps: torch.Tensor, seeds: torch.Tensor) -> None:
    """``seeds``: one row of integers per heatmap, on any device (they are read on the CPU)."""
    if seeds.dim() not in (1, 2) or len(seeds) != len(heatmaps) or not _is_integer(seeds):
        raise ValueError(f"seeds must be integers [B] or [B, k] with B = {len(heatmaps)} (one row per heatmap of "
                         f"{tuple(heatmaps.shape)}), got {seeds.dtype} {tuple(seeds.shape)}")


def _valid(heatmaps: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    return _valid_from_peaks(heatmaps.flatten(1).amax(1), masks)


def _valid_from_peaks(peak_values: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """``peak_values``: each heatmap's maximum; non-negative maps are all zero iff it is 0."""
    valid = peak_values > 0
    if masks is not None:
        # The max of the bytes: on CPU much faster than ``any`` on bool.
        valid &= masks.flatten(1).view(torch.uint8).amax(1) > 0
    return valid


def _nan_where_invalid(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~valid, math.nan)


def uniform_where_zero(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps, zero)``: ``heatmaps`` with each all-zero map replaced by a map of ones, and bool
    ``[B]``, which were. This is what the authors' Grad-CAM makes of an all-zero map: it adds 1e-8
    after normalising, and ``cv2.resize`` keeps a constant map constant, so their PG points at
    its first pixel (numpy's argmax: the top-left one), their SPG draws uniformly and their CH is
    the mask's share of the image. The scores take the ones as they would any map."""
    _check_heatmaps(heatmaps)
    zero = heatmaps.flatten(1).amax(1) == 0  # non-negative maps
    if zero.any():
        heatmaps = heatmaps.masked_fill(zero[:, None, None], 1)
    return heatmaps, zero


def valid_pairs(heatmaps: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B]``: False for an all-zero heatmap (it cannot be normalised) and, when ``masks``
    are given, for an empty mask (nothing to point at)."""
    _check_heatmaps(heatmaps)
    if masks is not None:
        _check_masks(heatmaps, masks)
    return _valid(heatmaps, masks)


@functools.cache
def _disc_half_widths(tolerance: float) -> tuple[int, ...]:
    """``widths[|dy|]``: the disc's row at vertical offset ``dy`` spans ``dx`` in
    ``[-widths[|dy|], widths[|dy|]]``, for ``|dy| <= radius`` (the largest integer < tolerance)."""
    radius = math.ceil(tolerance) - 1
    squared = tolerance * tolerance
    return tuple(max(dx for dx in range(radius + 1) if dx * dx + dy * dy < squared) for dy in range(radius + 1))


def _widen_rows_by_one(masks: torch.Tensor) -> torch.Tensor:
    widened = masks.clone()
    widened[..., 1:] |= masks[..., :-1]
    widened[..., :-1] |= masks[..., 1:]
    return widened


def dilate_masks(masks: torch.Tensor, tolerance: float = 15) -> torch.Tensor:
    """bool ``[B, H, W]``: pixels at distance < ``tolerance`` (strict) from some mask pixel.

    The disc is a stack of horizontal runs, one per row offset ``dy``; the dilated mask is the OR
    over ``dy`` of the mask widened horizontally by the run's half-width and shifted by ``dy``."""
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool [B, H, W], got {masks.dtype} {tuple(masks.shape)}")
    half_widths = _disc_half_widths(float(tolerance))
    height = masks.shape[1]
    dilated = torch.zeros_like(masks)
    widened, widened_by = masks, 0
    # From the outermost row offset inwards the half-widths only grow, so one horizontal
    # dilation is widened step by step rather than recomputed for every row offset.
    for dy in range(min(len(half_widths), height) - 1, -1, -1):
        while widened_by < half_widths[dy]:
            widened, widened_by = _widen_rows_by_one(widened), widened_by + 1
        dilated[:, dy:] |= widened[:, :height - dy]  # mask pixel dy rows above
        dilated[:, :height - dy] |= widened[:, dy:]  # mask pixel dy rows below
    return dilated


def _hits_at(masks: torch.Tensor, points: torch.Tensor, tolerance: float) -> torch.Tensor:
    """bool ``[B, P]``: whether each point (flat index into ``H * W``, long ``[B, P]``) lies within
    ``tolerance`` (strict) of a mask pixel, i.e. in ``dilate_masks(masks, tolerance)``.

    For each row offset ``dy`` of the disc, the mask row ``y + dy`` holds a pixel in the columns
    ``x - w .. x + w`` iff its prefix sums differ across that span."""
    _, height, width = masks.shape
    half_widths = torch.tensor(_disc_half_widths(float(tolerance)), device=masks.device)
    radius = len(half_widths) - 1
    dy = torch.arange(-radius, radius + 1, device=masks.device)
    half_width = half_widths[dy.abs()]

    rows = points.div(width, rounding_mode="floor").unsqueeze(-1) + dy  # [B, P, 2r+1]
    cols = points.remainder(width).unsqueeze(-1)
    row_inside = (rows >= 0) & (rows < height)
    rows = rows.clamp(0, height - 1)
    table = masks
    if points.shape[1] * len(dy) < height:
        # Few points (PG): prefix sums of just the rows they reach, gathered in (point, dy) order.
        table = masks.gather(1, rows.flatten(1).unsqueeze(-1).expand(-1, -1, width))
        rows = torch.arange(rows.shape[1] * rows.shape[2], device=masks.device).view(rows.shape[1:])
    row_start = rows * width
    first = row_start + (cols - half_width).clamp(min=0)
    last = row_start + (cols + half_width).clamp(max=width - 1)

    # Mask pixels in the row up to here. This cumulative sum is the costliest pass: int16 when a
    # row's count fits, as it is cheaper to write than int32.
    count_dtype = torch.int16 if width < 2**15 else torch.int32
    row_prefix = table.cumsum(-1, dtype=count_dtype).flatten(1)
    flat_table = table.flatten(1)

    def lookup(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index.flatten(1)).view(index.shape)

    # Inclusive prefix sums: count over [first, last] = prefix[last] - prefix[first] + mask[first].
    count = lookup(row_prefix, last) - lookup(row_prefix, first) + lookup(flat_table, first)
    return ((count > 0) & row_inside).any(-1)


def _first_maxima(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and the index of its first occurrence, as ``rows.max(1)`` gives them.
    On CPU numpy's vectorised argmax is about 10x faster than torch's (100 maps of 224 x 224:
    0.24 ms against 2.3 ms) and has the same rule for ties: the first occurrence."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64):
        return rows.max(1)
    peaks = torch.from_numpy(rows.detach().numpy().argmax(1))
    return rows.gather(1, peaks.unsqueeze(1)).squeeze(1), peaks


def pointing_hits(heatmaps: torch.Tensor, masks: torch.Tensor,
                  tolerance: float = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, valid)``, both bool ``[B]``: whether the heatmap's maximum lies within ``tolerance``
    of the mask, and whether the image can be scored at all (:func:`valid_pairs`); ``hits`` is
    False where ``valid`` is. Ties between maximal pixels: the first in row-major order (the
    documented rule of ``torch.max`` over a dim)."""
    _check_heatmaps(heatmaps)
    _check_masks(heatmaps, masks)
    peak_values, peaks = _first_maxima(heatmaps.flatten(1))
    valid = _valid_from_peaks(peak_values, masks)
    return _hits_at(masks, peaks.unsqueeze(1), tolerance).squeeze(1) & valid, valid


def pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor, tolerance: float = 15) -> torch.Tensor:
    """Per-image PG hit, bool ``[B]``: True iff the heatmap's maximum lies within ``tolerance`` of
    the mask (ties: the first maximal pixel in row-major order).

    A bool cannot mark an image that cannot be scored (all-zero heatmap, empty mask): such images
    come out False, which is not a miss. Leave them out with :func:`valid_pairs`, or take both at
    once from :func:`pointing_hits`, as ``PointingGame`` does (it counts them as skipped)."""
    return pointing_hits(heatmaps, masks, tolerance)[0]


# Pixels per slice of the batch (4 MB of float32): see _batch_slices.
_SLICE_PIXELS = 2**20


def _batch_slices(heatmaps: torch.Tensor) -> list[slice]:
    """Slices of the batch of at most ``_SLICE_PIXELS`` pixels each (one image at least).

    Functions that make whole-batch temporaries work slice by slice: on CPU a temporary of tens
    of MB (a batch of 224 px maps) comes as freshly mapped memory, page faults included, each time,
    while a slice's fit in the cache and are reused by the allocator. Measured on 100 maps of
    224 x 224 after other work: content heatmap 14 ms as one batch, 4 ms in slices."""
    step = max(1, _SLICE_PIXELS // max(1, heatmaps[0].numel())) if len(heatmaps) else 1
    return [slice(start, start + step) for start in range(0, max(1, len(heatmaps)), step)]


# Tags of the random streams, so that no two uses of the same seeds draw the same numbers. A
# stream's number is its position: new streams go at the end, so that old ones keep their draws.
_STREAMS = ("spg", "noise", "order", "road")


def _rows(seeds: torch.Tensor) -> torch.Tensor:
    """``[B]`` or ``[B, k]`` as ``[B, k]``."""
    return seeds.unsqueeze(1) if seeds.dim() == 1 else seeds


def trial_seeds(seed: int, trials: torch.Tensor) -> torch.Tensor:
    """long ``[B, 1 + k]``: ``seed`` before each row of ``trials`` (long ``[B]`` or ``[B, k]``,
    what identifies each trial), the seeds of :func:`trial_uniforms` for one run's ``seed``."""
    return torch.cat([torch.full((len(trials), 1), seed, dtype=torch.long), _rows(trials).long().cpu()], 1)


def _trial_draws(stream: str, seeds: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
                 normal: bool) -> torch.Tensor:
    if stream not in _STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {list(_STREAMS)}")
    if seeds.numel() and seeds.min() < 0:
        raise ValueError(f"seeds must be non-negative, got {int(seeds.min())}")
    rows = _rows(seeds).tolist()
    draws = torch.empty(len(rows), *shape, dtype=dtype)
    out = draws.numpy()
    for index, row in enumerate(rows):
        generator = np.random.default_rng([_STREAMS.index(stream), *row])
        if normal:
            generator.standard_normal(out=out[index], dtype=out.dtype)
        else:
            generator.random(out=out[index], dtype=out.dtype)
    return draws


def trial_uniforms(stream: str, seeds: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``[B, *shape]`` uniforms in [0, 1) on the CPU (float32 or float64): row ``b`` comes from
    numpy's default generator seeded with ``(stream, *seeds[b])`` (``seeds``: non-negative
    integers ``[B]`` or ``[B, k]``), so from that row alone.

    Rows of one width: numpy's ``SeedSequence`` pads short seeds with zeros, so ``(1, 2)`` and
    ``(1, 2, 0)`` seed the same stream. About 9 us per row (a generator each), vectorised within."""
    return _trial_draws(stream, seeds, shape, dtype, normal=False)


def trial_normals(stream: str, seeds: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Standard normal draws, as :func:`trial_uniforms` draws uniforms: row ``b`` from ``seeds[b]``
    alone."""
    return _trial_draws(stream, seeds, shape, dtype, normal=True)


def _resolve_seeds(heatmaps: torch.Tensor, generator: torch.Generator | None,
                   seeds: torch.Tensor | None) -> torch.Tensor:
    """The images' seeds: ``seeds`` as given, or, without them, one drawn per image from
    ``generator`` (the global generator where None)."""
    if seeds is None:
        return torch.randint(0, 2**62, (len(heatmaps),), generator=generator)
    if generator is not None:
        raise ValueError("give seeds or a generator, not both: the seeds alone decide the points")
    _check_seeds(heatmaps, seeds)
    return seeds


def _sample_points(heatmaps: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
                   seeds: torch.Tensor | None = None) -> torch.Tensor:
    """long ``[B, num_samples]``: flat indices drawn with replacement from each heatmap taken as a
    distribution, image ``b``'s by inverse transform sampling of the uniforms of
    ``trial_uniforms("spg", seeds[b])`` (seeds: :func:`_resolve_seeds`), slice by slice
    (:func:`_batch_slices`). All-zero heatmaps have no distribution; they draw uniformly, and
    their scores are NaN anyway."""
    seeds = _resolve_seeds(heatmaps, generator, seeds)
    # At least float32: a reduced-precision running sum would stall on large maps.
    dtype = torch.promote_types(heatmaps.dtype, torch.float32)
    flat = heatmaps.flatten(1)
    # One buffer for every slice: a fresh one each time costs page faults (see _batch_slices).
    buffer = torch.empty(_batch_slices(heatmaps)[0].stop, flat.shape[1], dtype=dtype, device=heatmaps.device)
    draws = []
    for part in _batch_slices(heatmaps):
        cumulative = torch.cumsum(flat[part].to(dtype), 1, out=buffer[:len(flat[part])])
        empty = cumulative[:, -1] <= 0
        if empty.any():
            cumulative[empty] = torch.arange(1, flat.shape[1] + 1, dtype=dtype, device=heatmaps.device)
        total = cumulative[:, -1:]
        uniforms = trial_uniforms("spg", seeds[part], (num_samples,), dtype).to(heatmaps.device)
        # The pixel drawn is the first whose running sum exceeds u * total: never one of weight 0,
        # whose sum equals its predecessor's. Below total, so that rounding up cannot pass the
        # last pixel of positive weight.
        values = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
        draws.append(torch.searchsorted(cumulative, values, right=True))
    return torch.cat(draws)


def _stochastic_scores(
    heatmaps: torch.Tensor, masks: torch.Tensor, num_samples: int, num_runs: int, tolerance: float,
    generator: torch.Generator | None, seeds: torch.Tensor | None,
) -> torch.Tensor:
    """float ``[B, num_runs]``: hit fraction of ``num_samples`` points in each of ``num_runs``
    independent runs (one draw of ``num_runs * num_samples`` points, split in runs), the points
    of ``_sample_points(heatmaps, num_runs * num_samples, generator, seeds)``."""
    _check_heatmaps(heatmaps)
    _check_masks(heatmaps, masks)
    points = _sample_points(heatmaps, num_runs * num_samples, generator, seeds)
    hits = torch.cat([_hits_at(masks[part], points[part], tolerance) for part in _batch_slices(heatmaps)])
    scores = hits.view(-1, num_runs, num_samples).to(heatmaps.dtype).mean(-1)
    return _nan_where_invalid(scores, _valid(heatmaps, masks).unsqueeze(1))


def stochastic_pointing_game(
    heatmaps: torch.Tensor, masks: torch.Tensor, num_samples: int = 100, tolerance: float = 15,
    generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image SPG score, float ``[B]``: the fraction of ``num_samples`` points drawn from the
    normalised heatmap that lie within ``tolerance`` of the mask; NaN for invalid images.
    ``seeds`` (non-negative integers ``[B]`` or ``[B, k]``): image ``b``'s points depend on
    ``seeds[b]`` alone; without them, each image's seed is drawn from ``generator``. The points
    are those of ``_sample_points(heatmaps, num_samples, generator, seeds)``."""
    return _stochastic_scores(heatmaps, masks, num_samples, 1, tolerance, generator, seeds).squeeze(1)


def content_heatmap(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image CH, float ``[B]``: share of heatmap mass on mask pixels (no tolerance); NaN for
    invalid images."""
    _check_heatmaps(heatmaps)
    _check_masks(heatmaps, masks)
    # Slice by slice (see _batch_slices), and a product with the mask's bytes: on CPU several
    # times faster than ``torch.where``, and exact (finite heatmaps times 0 or 1).
    inside = torch.cat([(heatmaps[part] * masks[part].view(torch.uint8)).flatten(1).sum(1)
                        for part in _batch_slices(heatmaps)])
    share = inside / heatmaps.flatten(1).sum(1)
    return _nan_where_invalid(share, _valid(heatmaps, masks))


def _half_weights(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Weights of the first half of ``size`` rows (or columns): 1 before the middle, 0 after it,
    and 1/2 on the middle one when ``size`` is odd, so that it is split evenly between halves."""
    weights = (torch.arange(size, device=device) < size // 2).to(dtype)
    if size % 2:
        weights[size // 2] = 0.5
    return weights


def negative_quadrants_heatmap(heatmaps: torch.Tensor, positive_cell: torch.Tensor) -> torch.Tensor:
    """Per-composite NQH, float ``[B]``: share of heatmap mass in the three cells other than
    ``positive_cell`` (long ``[B]``; 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right);
    NaN for an all-zero heatmap. Scale-free, so any map size works. On an odd side (AlexNet's
    27 x 27) the middle row's mass is split evenly between the top and bottom cells, and the middle
    column's between left and right (the centre pixel a quarter to each cell)."""
    _check_heatmaps(heatmaps)
    height, width = heatmaps.shape[1:]
    if height < 2 or width < 2:
        raise ValueError(f"a 2x2 composite's heatmap needs at least 2x2 pixels, got {height}x{width}")
    _check_per_image(heatmaps, "positive_cell", positive_cell, 0, 3)
    top = _half_weights(height, heatmaps.dtype, heatmaps.device)
    left = _half_weights(width, heatmaps.dtype, heatmaps.device)
    row_halves = torch.stack([top, 1 - top])  # [2, H]: top, bottom
    column_halves = torch.stack([left, 1 - left])  # [2, W]: left, right
    cell_mass = torch.einsum("rh,bhw,cw->brc", row_halves, heatmaps, column_halves).flatten(1)  # cells 0..3
    total = cell_mass.sum(1)
    positive = cell_mass.gather(1, positive_cell.long().unsqueeze(1)).squeeze(1)
    return _nan_where_invalid((total - positive) / total, _valid(heatmaps, None))


def upsample(heatmaps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize ``[B, h, w] -> [B, H, W]`` (``align_corners=False``). Bilinear weights are
    convex, so non-negative maps stay non-negative and all-zero maps stay all-zero."""
    _check_heatmaps(heatmaps)
    size = tuple(size)
    if tuple(heatmaps.shape[-2:]) == size:
        return heatmaps
    return F.interpolate(heatmaps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


# --- Faithfulness: does removing what the map ranks first change the decision? ---
#
# Maps here are ``[B, H, W]`` at the images' size, finite, of any sign (a larger value ranks
# first). Every function ranks the pixels with :func:`pixel_ranks`: ties (a ReLU'd map's exact
# zeros) are broken by a random order seeded per trial, so exactly the stated number of pixels
# moves at each step, never "every pixel at or above a percentile". The perturbed images of all
# images and steps go through the network in chunks of ``batch_size``; the network is called in
# ``torch.no_grad()`` as it is (put it in eval mode).

# Substrates of insertion and deletion: a Gaussian blur of the image (RISE's insertion start:
# kernel 11, sigma 5) or black pixels (RISE's deletion end, in pixel space).
SUBSTRATES = ("blur", "zeros")
# The score of the explained class after each step: its probability (softmax over the classes;
# sigmoid on multi-label data), its logit, or whether it is still predicted (argmax; multi-label:
# logit > 0).
PERTURBATION_SCORES = ("probability", "logit", "accuracy")
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


def _check_faithfulness_inputs(images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
                               seeds: torch.Tensor) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if heatmaps.shape != (images.shape[0], *images.shape[2:]) or not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be float [B, H, W] at the images' size {tuple(images.shape)} (upsample "
                         f"them first), got {heatmaps.dtype} {tuple(heatmaps.shape)}")
    if not bool(torch.isfinite(heatmaps).all()):
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} must be finite, got "
                         f"{int((~torch.isfinite(heatmaps)).sum())} NaN or inf values")
    _check_same_device(heatmaps, "images", images)
    if classes.shape != heatmaps.shape[:1] or not _is_integer(classes):
        raise ValueError(f"classes must be integers [B] = [{len(heatmaps)}], "
                         f"got {classes.dtype} {tuple(classes.shape)}")
    _check_same_device(heatmaps, "classes", classes)
    _check_seeds(heatmaps, seeds)


def pixel_ranks(heatmaps: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """long ``[B, H * W]``: each pixel's place when the map's pixels are taken in decreasing value,
    0 first; equal values in a random order drawn from ``trial_uniforms("order", seeds[b])``
    (``seeds``: non-negative integers ``[B]`` or ``[B, k]``), so a map's ranking depends on its
    trial alone."""
    flat = heatmaps.flatten(1)
    keys = trial_uniforms("order", seeds, (flat.shape[1],), torch.float64).to(flat.device)
    shuffled = keys.argsort(1)
    # A stable sort of the shuffled values: equal values keep the random order.
    order = shuffled.gather(1, flat.gather(1, shuffled).argsort(dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))


def substrate(images: torch.Tensor, name: str) -> torch.Tensor:
    """The substrate ``name`` (:data:`SUBSTRATES`) of pixel-space ``images`` ``[B, C, H, W]``."""
    if name == "zeros":
        return torch.zeros_like(images)
    if name == "blur":
        return gaussian_blur(images, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
    raise ValueError(f"unknown substrate {name!r}; known: {list(SUBSTRATES)}")


def class_scores(logits: torch.Tensor, classes: torch.Tensor, score: str, multilabel: bool) -> torch.Tensor:
    """float ``[B]``: the ``score`` (:data:`PERTURBATION_SCORES`) of class ``classes[b]`` in
    ``logits[b]``."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    chosen = logits.gather(1, classes.long().unsqueeze(1)).squeeze(1)
    if score == "logit":
        return chosen
    if score == "probability":
        return chosen.sigmoid() if multilabel else logits.softmax(1).gather(1, classes.long().unsqueeze(1)).squeeze(1)
    if score == "accuracy":
        return (chosen > 0 if multilabel else logits.argmax(1) == classes).to(logits.dtype)
    raise ValueError(f"unknown score {score!r}; known: {list(PERTURBATION_SCORES)}")


# Arithmetic of the passes that need no gradient (evaluation.precision): float32, or bfloat16
# under autocast where the numbers allow it (a test bounds the difference).
PRECISIONS = ("32", "bf16-mixed")


def forward_precision(precision: str, device: torch.device):
    """The context of a forward-only pass at ``precision`` (:data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _scores_of_perturbed(net: torch.nn.Module, count: int, points: int, classes: torch.Tensor,
                         perturbed, score: str, multilabel: bool, batch_size: int,
                         precision: str = "32") -> torch.Tensor:
    """float ``[count, points]``: the class scores of ``perturbed(images, points) -> images``, each
    item (image ``b``, point ``k``) of the ``count * points`` once, ``batch_size`` per forward, at
    ``precision``."""
    scores = []
    with torch.no_grad():
        for start in range(0, count * points, batch_size):
            items = torch.arange(start, min(start + batch_size, count * points), device=classes.device)
            image, point = items.div(points, rounding_mode="floor"), items.remainder(points)
            inputs = perturbed(image, point)  # in float32: ROAD's imputation solves a linear system
            with forward_precision(precision, classes.device):
                logits = net(inputs)
            scores.append(class_scores(logits, classes[image], score, multilabel))
    if not scores:
        return torch.empty(count, points, device=classes.device)
    return torch.cat(scores).view(count, points)


def perturbation_steps(pixels: int, steps: int) -> torch.Tensor:
    """long ``[steps + 1]``: pixels moved after each step ``k``, ``floor(k * pixels / steps + 1/2)``:
    ``pixels / steps`` at a time where that is whole (1,792 of 224 x 224 in 28 steps), else steps
    that differ by one pixel at most; always ``steps + 1`` points from 0 to ``pixels``."""
    if steps < 1 or pixels < steps:
        raise ValueError(f"{steps} perturbation steps need at least one pixel each, got {pixels} pixels")
    return (2 * torch.arange(steps + 1) * pixels + steps).div(2 * steps, rounding_mode="floor")


def perturbation_curves(net: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
                        seeds: torch.Tensor, *, insertion: bool, steps: int, substrate_name: str,
                        score: str = "probability", multilabel: bool = False, batch_size: int = 64,
                        precision: str = "32") -> tuple[torch.Tensor, torch.Tensor]:
    """``(fractions [steps + 1], curves [B, steps + 1])``: the class score after each step of insertion
    (start from the substrate, put the image's pixels back, first-ranked first) or deletion
    (start from the image, replace its pixels by the substrate's), ``fractions`` the share of the
    pixels moved (:func:`perturbation_steps`). The curves start at the substrate's (insertion) or
    the image's own (deletion) score and end at the other."""
    _check_faithfulness_inputs(images, heatmaps, classes, seeds)
    pixels = images.shape[-2] * images.shape[-1]
    counts = perturbation_steps(pixels, steps).to(images.device)
    ranks = pixel_ranks(heatmaps, seeds)
    blank = substrate(images, substrate_name)
    first, rest = (images, blank) if insertion else (blank, images)

    def perturbed(image: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        moved = (ranks[image] < counts[point].unsqueeze(1)).view(-1, 1, *images.shape[2:])
        return torch.where(moved, first[image], rest[image])

    curves = _scores_of_perturbed(net, len(images), len(counts), classes, perturbed, score, multilabel, batch_size,
                                  precision)
    return counts.to(curves.dtype) / pixels, curves


def curve_area(fractions: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
    """float ``[B]``: the trapezoid-rule area under each curve ``[B, S]`` over ``fractions`` ``[S]``
    divided by the span of the fractions: the curve's mean height (for insertion and deletion,
    whose fractions run from 0 to 1, the area itself)."""
    return torch.trapezoid(curves, fractions.to(curves), dim=1) / (fractions[-1] - fractions[0])


def insertion_auc(net: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
                  seeds: torch.Tensor, *, steps: int = 28, substrate_name: str = "blur", score: str = "probability",
                  multilabel: bool = False, batch_size: int = 64) -> torch.Tensor:
    """Per-image insertion AUC (RISE; Petsiuk et al., BMVC 2018), float ``[B]``: the area under
    :func:`perturbation_curves` with ``insertion=True``; higher is better."""
    return curve_area(*perturbation_curves(net, images, heatmaps, classes, seeds, insertion=True, steps=steps,
                                           substrate_name=substrate_name, score=score, multilabel=multilabel,
                                           batch_size=batch_size))


def deletion_auc(net: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
                 seeds: torch.Tensor, *, steps: int = 28, substrate_name: str = "zeros", score: str = "probability",
                 multilabel: bool = False, batch_size: int = 64) -> torch.Tensor:
    """Per-image deletion AUC (RISE), float ``[B]``: the area under :func:`perturbation_curves`
    with ``insertion=False``; lower is better."""
    return curve_area(*perturbation_curves(net, images, heatmaps, classes, seeds, insertion=False, steps=steps,
                                           substrate_name=substrate_name, score=score, multilabel=multilabel,
                                           batch_size=batch_size))


ROAD_ORDERS = ("morf", "lerf")


def road_removed(ranks: torch.Tensor, count: torch.Tensor, order: str) -> torch.Tensor:
    """bool ``[B, H * W]``: the ``count`` (long ``[B]``) pixels ROAD removes: the first-ranked ones
    (``morf``, most relevant first) or the last-ranked ones (``lerf``, least relevant first)."""
    if order == "morf":
        return ranks < count.unsqueeze(1)
    if order == "lerf":
        return ranks >= ranks.shape[1] - count.unsqueeze(1)
    raise ValueError(f"unknown ROAD order {order!r}; known: {list(ROAD_ORDERS)}")


def road(net: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
         seeds: torch.Tensor, *, percentages: Sequence[float], order: str, noise: float = 0.01,
         score: str = "probability", multilabel: bool = False, batch_size: int = 64,
         precision: str = "32") -> torch.Tensor:
    """ROAD (Rong et al., ICML 2022), float ``[B, P]``: the class score after removing
    ``round(p / 100 * H * W)`` pixels for each ``p`` of ``percentages`` (in (0, 100)), in ``order``
    (:func:`road_removed`), by noisy linear imputation (:mod:`evaluation.metrics.imputation`; the
    noise, standard deviation ``noise``, drawn from ``trial_normals("road", (seeds[b], p's index,
    order))``). MoRF: lower is better; LeRF: higher."""
    if order not in ROAD_ORDERS:
        raise ValueError(f"unknown ROAD order {order!r}; known: {list(ROAD_ORDERS)}")
    _check_faithfulness_inputs(images, heatmaps, classes, seeds)
    pixels = heatmaps.shape[1] * heatmaps.shape[2]
    counts = torch.tensor([round(p / 100 * pixels) for p in percentages], dtype=torch.long, device=images.device)
    ranks = pixel_ranks(heatmaps, seeds)
    rows = _rows(seeds).long().cpu()
    order_number = ROAD_ORDERS.index(order)

    def perturbed(image: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        removed = road_removed(ranks[image], counts[point], order).view(-1, *images.shape[2:])
        noise_seeds = torch.cat([rows[image.cpu()], point.cpu().unsqueeze(1),
                                 torch.full((len(image), 1), order_number)], 1)
        draws = trial_normals("road", noise_seeds, images.shape[1:], images.dtype).to(images.device)
        return noisy_linear_imputation(images[image], removed, noise * draws)

    return _scores_of_perturbed(net, len(images), len(counts), classes, perturbed, score, multilabel, batch_size,
                                precision)


# --- Randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018) ---

# Similarities of a map to the original one: Spearman rank correlation of the absolute values
# and of the signed values, and SSIM of the absolute values scaled to [0, 1].
SIMILARITIES = ("spearman_abs", "spearman", "ssim")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """float64 ``[B, N]``: each value's rank in its row, 1-based, equal values sharing the mean of
    their ranks (Spearman's convention). By hand: torchmetrics' Spearman resolves ties in a Python
    loop (17 s for 64 maps of 224 x 224, a ReLU'd map being mostly ties) and scores a constant map
    0 where the correlation is undefined."""
    ordered, order = values.sort(1)
    count = values.shape[1]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1  # the tie group of each sorted position
    position = torch.arange(1, count + 1, dtype=torch.float64, device=values.device).expand_as(ordered)
    first = torch.zeros(values.shape, dtype=torch.float64, device=values.device).scatter_reduce(
        1, group, position, "amin", include_self=False)
    last = torch.zeros_like(first).scatter_reduce(1, group, position, "amax", include_self=False)
    sorted_ranks = ((first + last) / 2).gather(1, group)
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: Spearman's rank correlation of each row of ``first`` and ``second``
    (``[B, N]``); NaN where a row is constant (undefined)."""
    ranks = [average_ranks(rows.flatten(1)) for rows in (first, second)]
    centred = [rank - rank.mean(1, keepdim=True) for rank in ranks]
    scale = centred[0].norm(dim=1) * centred[1].norm(dim=1)
    correlation = (centred[0] * centred[1]).sum(1) / scale
    return correlation.masked_fill(scale == 0, math.nan)


def map_similarity(original: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: float64 [B]}`` for each of :data:`SIMILARITIES`, of maps ``other`` to ``original``
    (``[B, H, W]``, finite, any sign); NaN where undefined (a constant map for Spearman, an
    all-zero one for SSIM). SSIM: torchmetrics' (Gaussian window 11, sigma 1.5)."""
    if original.shape != other.shape or original.dim() != 3:
        raise ValueError(f"maps must be [B, H, W] of one shape, got {tuple(original.shape)} and {tuple(other.shape)}")
    magnitudes = [maps.abs().double() for maps in (original, other)]
    peaks = [maps.flatten(1).amax(1) for maps in magnitudes]
    scaled = [maps / peak.clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]
              for maps, peak in zip(magnitudes, peaks)]
    # In float32: maps scaled to [0, 1] need no more, and torchmetrics' 11 x 11 window in float64
    # costs about 4x as much on the CPU (it was 70% of the randomisation test at 224 px).
    ssim = structural_similarity_index_measure(scaled[1].float().unsqueeze(1), scaled[0].float().unsqueeze(1),
                                              data_range=1.0, reduction="none")
    return {"spearman_abs": spearman(magnitudes[0], magnitudes[1]),
            "spearman": spearman(original.double(), other.double()),
            "ssim": ssim.double().masked_fill((peaks[0] == 0) | (peaks[1] == 0), math.nan)}


def parameter_blocks(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The network's blocks from the input to the logits, each with its qualified name: sequential
    containers (``nn.Sequential``, ``nn.ModuleList``) are opened, any other module that holds
    parameters is one block (a ResNet's stem convolution and batch norm, each residual block, the
    final linear layer; each of AlexNet's convolutions and linear layers)."""
    blocks: list[tuple[str, torch.nn.Module]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)) or (
                not any(True for _ in module.parameters(recurse=False)) and not prefix):
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)
        elif any(True for _ in module.parameters()):
            blocks.append((prefix, module))

    visit("", net)
    return blocks


def randomise_block(block: torch.nn.Module, seed: int, number: int) -> None:
    """Re-initialise every layer of ``block`` the way PyTorch initialises it (``reset_parameters``:
    a batch norm also forgets its running statistics), drawn from a generator seeded by ``(seed,
    number)`` so that a block gets the same weights in the cascading and independent variants."""
    devices = [parameter.device for parameter in block.parameters() if parameter.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted(set(devices), key=str)):
        torch.manual_seed(int(np.random.SeedSequence([seed, number]).generate_state(1)[0]))
        for layer in block.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def randomisation_similarity(net: torch.nn.Module, explainer, images: torch.Tensor, classes: torch.Tensor, *,
                             seed: int, cascading: bool = True) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Model-parameter randomisation: ``(block names, {similarity: float64 [B, S]})``. Step ``s``
    randomises the ``s + 1`` blocks nearest the logits (:func:`parameter_blocks`, cascading) or
    only the ``s + 1``-th of them (independent), on a copy of ``net``; ``explainer(net, images,
    classes) -> maps [B, h, w]`` is recomputed and compared to the original maps, both upsampled
    to the images' size (:func:`map_similarity`). A map that stays similar after the weights it
    should depend on are random fails the check."""
    size = images.shape[-2:]

    def explain(model: torch.nn.Module) -> torch.Tensor:
        maps = explainer(model, images, classes).detach()
        return maps if tuple(maps.shape[-2:]) == tuple(size) else F.interpolate(
            maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)

    original = explain(net)
    names = [name for name, _ in parameter_blocks(net)]
    steps: dict[str, list[torch.Tensor]] = {name: [] for name in SIMILARITIES}
    randomised = copy.deepcopy(net)
    for step, name in enumerate(reversed(names)):
        if not cascading:
            randomised = copy.deepcopy(net)
        number = len(names) - 1 - step  # the block's place from the input: its seed in both variants
        randomise_block(randomised.get_submodule(name), seed, number)
        for key, value in map_similarity(original, explain(randomised)).items():
            steps[key].append(value)
    return list(reversed(names)), {key: torch.stack(values, 1) for key, values in steps.items()}
