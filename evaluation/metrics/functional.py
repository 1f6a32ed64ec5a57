"""Explanation-quality metrics as pure functions of batched tensors (paper section 4.3).

Inputs: ``heatmaps`` float ``[B, H, W]``, finite and non-negative, already at the mask's size
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

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "content_heatmap",
    "dilate_masks",
    "negative_quadrants_heatmap",
    "pointing_game",
    "pointing_hits",
    "stochastic_pointing_game",
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


# Tags of the random streams, so that no two uses of the same seeds draw the same numbers.
_STREAMS = ("spg", "noise")


def _rows(seeds: torch.Tensor) -> torch.Tensor:
    """``[B]`` or ``[B, k]`` as ``[B, k]``."""
    return seeds.unsqueeze(1) if seeds.dim() == 1 else seeds


def trial_seeds(seed: int, trials: torch.Tensor) -> torch.Tensor:
    """long ``[B, 1 + k]``: ``seed`` before each row of ``trials`` (long ``[B]`` or ``[B, k]``,
    what identifies each trial), the seeds of :func:`trial_uniforms` for one run's ``seed``."""
    return torch.cat([torch.full((len(trials), 1), seed, dtype=torch.long), _rows(trials).long().cpu()], 1)


def trial_uniforms(stream: str, seeds: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``[B, *shape]`` uniforms in [0, 1) on the CPU (float32 or float64): row ``b`` comes from
    numpy's default generator seeded with ``(stream, *seeds[b])`` (``seeds``: non-negative
    integers ``[B]`` or ``[B, k]``), so from that row alone.

    Rows of one width: numpy's ``SeedSequence`` pads short seeds with zeros, so ``(1, 2)`` and
    ``(1, 2, 0)`` seed the same stream. About 9 us per row (a generator each), vectorised within."""
    if stream not in _STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {list(_STREAMS)}")
    if seeds.numel() and seeds.min() < 0:
        raise ValueError(f"seeds must be non-negative, got {int(seeds.min())}")
    rows = _rows(seeds).tolist()
    uniforms = torch.empty(len(rows), *shape, dtype=dtype)
    out = uniforms.numpy()
    for index, row in enumerate(rows):
        np.random.default_rng([_STREAMS.index(stream), *row]).random(out=out[index], dtype=out.dtype)
    return uniforms


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
