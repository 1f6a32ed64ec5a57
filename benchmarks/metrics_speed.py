"""Speed of the vectorised PG, SPG and CH against per-image loops, with identical results.

    python benchmarks/metrics_speed.py [--images 1000] [--size 224] [--batch 100] [--samples 100]
                                       [--tolerance 15] [--threads 1] [--seed 0]

Two per-image references, each checked to give the vectorised results:
- "authors": the authors' procedure (their TorchRay-derived evaluation scripts): one image at a
  time; for the maximum point (PG) and for each sampled point (SPG) a full H x W grid of squared
  distances to the point (``torch.meshgrid``), ANDed with the mask; CH as the masked sum over the
  sum. The speed target (>= 20x on PG + SPG + CH together) is against this one.
- "mask px": a stronger naive loop in numpy: the mask's pixels are listed once per image, and
  each point is scored by its distances to those pixels only, not a whole grid.
Both score the very points the vectorised SPG drew (drawn again from the same seed, outside their
timing; the vectorised time includes its sampling). All run in one process, alternating batch by
batch, so the ratios are robust to machine noise. One thread by default: the loops use one core,
and a shared machine makes multi-threaded timings erratic.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import functional  # noqa: E402

METRICS = ("PG", "SPG", "CH")
REFERENCES = ("authors", "mask px")


def random_pairs(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM-like heatmaps (7x7, peaky, upsampled) and masks: random boxes (even images) and
    blobs of thresholded smooth noise (odd images)."""
    heatmaps = functional.upsample(torch.rand(batch, 7, 7, generator=generator) ** 3, (size, size))
    blobs = functional.upsample(torch.rand(batch, 5, 5, generator=generator), (size, size)) > 0.65
    y0, y1 = torch.randint(0, size, (batch, 2, 1, 1), generator=generator).sort(1).values.unbind(1)
    x0, x1 = torch.randint(0, size, (batch, 2, 1, 1), generator=generator).sort(1).values.unbind(1)
    rows, cols = torch.arange(size).view(1, -1, 1), torch.arange(size).view(1, 1, -1)
    boxes = (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
    masks = torch.where(torch.arange(batch).view(-1, 1, 1) % 2 == 0, boxes, blobs)
    return heatmaps, masks


def grid_hit(mask: torch.Tensor, y: int, x: int, tolerance: float) -> bool:
    """The authors' test of one point: a grid of squared distances to it over the whole image."""
    v, u = torch.meshgrid((torch.arange(mask.shape[0], dtype=torch.float32) - y) ** 2,
                          (torch.arange(mask.shape[1], dtype=torch.float32) - x) ** 2, indexing="ij")
    return bool((mask & ((v + u) < tolerance ** 2)).any())


def authors_scores(heatmaps: torch.Tensor, masks: torch.Tensor, points: np.ndarray, tolerance: float,
                   metric: str) -> np.ndarray:
    """One image at a time, as the authors' scripts do; NaN where the image cannot be scored."""
    scores = np.full(len(heatmaps), np.nan)
    width = heatmaps.shape[2]
    for index, (heatmap, mask) in enumerate(zip(heatmaps, masks)):
        total = float(heatmap.sum())
        if total <= 0 or not mask.any():
            continue
        if metric == "PG":
            peak = int(heatmap.argmax())
            scores[index] = grid_hit(mask, peak // width, peak % width, tolerance)
        elif metric == "SPG":
            scores[index] = np.mean([grid_hit(mask, p // width, p % width, tolerance) for p in points[index]])
        else:
            scores[index] = float((heatmap / total * mask).sum())
    return scores


def distance_hit(ys: np.ndarray, xs: np.ndarray, y: int, x: int, tolerance: float) -> bool:
    return bool(np.sqrt((ys - y) ** 2 + (xs - x) ** 2).min() < tolerance)


def mask_pixel_scores(heatmaps: torch.Tensor, masks: torch.Tensor, points: np.ndarray, tolerance: float,
                      metric: str) -> np.ndarray:
    """One image at a time, distances to the mask's pixels only; NaN where it cannot be scored."""
    heatmaps, masks = heatmaps.numpy(), masks.numpy()
    scores = np.full(len(heatmaps), np.nan)
    width = heatmaps.shape[2]
    for index, (heatmap, mask) in enumerate(zip(heatmaps, masks)):
        ys, xs = np.nonzero(mask)
        if not heatmap.any() or not len(ys):
            continue
        if metric == "PG":
            y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
            scores[index] = distance_hit(ys, xs, y, x, tolerance)
        elif metric == "SPG":
            scores[index] = np.mean([distance_hit(ys, xs, p // width, p % width, tolerance) for p in points[index]])
        else:
            scores[index] = heatmap[mask].sum() / heatmap.sum()
    return scores


def vectorised_scores(heatmaps, masks, samples, tolerance, seed, metric) -> np.ndarray:
    if metric == "PG":
        # The float of the bool hits, NaN where the image cannot be scored, like the loops.
        hits, valid = functional.pointing_hits(heatmaps, masks, tolerance)
        return hits.double().masked_fill(~valid, np.nan).numpy()
    if metric == "SPG":
        generator = torch.Generator().manual_seed(seed)
        return functional.stochastic_pointing_game(heatmaps, masks, samples, tolerance, generator).double().numpy()
    return functional.content_heatmap(heatmaps, masks).double().numpy()


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def agreement(metric: str, fast: np.ndarray, slow: np.ndarray, samples: int) -> str:
    """PG and SPG count hits (out of 1 or out of ``samples``), so their scores must agree exactly
    up to the float32 rounding of k / samples; CH compares float32 sums with other float sums."""
    if not np.array_equal(np.isnan(fast), np.isnan(slow)):
        raise AssertionError(f"{metric}: vectorised and per-image loop skip different images")
    if metric == "CH":
        return f"max |diff| {np.nanmax(np.abs(fast - slow)):.1e}"
    if not np.array_equal(np.round(fast * samples), np.round(slow * samples), equal_nan=True):
        raise AssertionError(f"{metric}: vectorised and per-image loop scores differ")
    return f"identical ({int(np.isnan(fast).sum())} skipped)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    loops = {"authors": authors_scores, "mask px": mask_pixel_scores}

    kinds = ("vectorised",) + REFERENCES
    seconds = {(kind, metric): 0.0 for kind in kinds for metric in METRICS}
    scores = {(kind, metric): [] for kind in kinds for metric in METRICS}
    for start in range(0, args.images, args.batch):
        heatmaps, masks = random_pairs(min(args.batch, args.images - start), args.size, generator)
        sample_seed = args.seed + start
        # The points the vectorised SPG draws, drawn again for the loops (not timed).
        sampler = torch.Generator().manual_seed(sample_seed)
        points = functional._sample_points(heatmaps, args.samples, sampler).numpy()
        for metric in METRICS:
            result, elapsed = timed(vectorised_scores, heatmaps, masks, args.samples, args.tolerance, sample_seed,
                                    metric)
            seconds["vectorised", metric] += elapsed
            scores["vectorised", metric].append(result)
            for kind in REFERENCES:
                result, elapsed = timed(loops[kind], heatmaps, masks, points, args.tolerance, metric)
                seconds[kind, metric] += elapsed
                scores[kind, metric].append(result)

    print(f"{args.images} pairs of {args.size}x{args.size}, batches of {args.batch}, SPG {args.samples} samples, "
          f"tolerance {args.tolerance:g} px, {args.threads} thread(s)")
    header = "".join(f"{kind + ' s':>12}{'speed-up':>10}" for kind in REFERENCES)
    print(f"{'metric':<8}{'vectorised s':>14}{header}  results (against each loop)")
    for metric in METRICS + ("total",):
        names = METRICS if metric == "total" else (metric,)
        fast = sum(seconds["vectorised", name] for name in names)
        row = f"{metric:<8}{fast:>14.3f}"
        checks = []
        for kind in REFERENCES:
            slow = sum(seconds[kind, name] for name in names)
            row += f"{slow:>12.3f}{slow / fast:>9.1f}x"
            if metric != "total":
                checks.append(agreement(metric, np.concatenate(scores["vectorised", metric]),
                                        np.concatenate(scores[kind, metric]), args.samples))
        print(f"{row}  {'; '.join(checks)}")


if __name__ == "__main__":
    main()
