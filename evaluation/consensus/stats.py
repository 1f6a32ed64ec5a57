"""Statistics over a committee: correlations between columns of a table (accuracy, consensus
scores, mAPs) and the average precision of a map against an object mask.

Correlations use ``scipy.stats.pearsonr`` and ``scipy.stats.spearmanr`` (two-sided p-values).
Average precision uses ``torchmetrics.functional.classification.binary_average_precision``.
Definitions: ``docs/consensus.md``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats
from torchmetrics.functional.classification import binary_average_precision

# Cells that mean "no value" (compared after stripping blanks, case-insensitively).
MISSING = ("", "n/a")
# Fewer usable rows than this give no correlation.
MIN_ROWS = 3


def is_missing(value) -> bool:
    """True for None, NaN, and the strings '' and 'N/A' (any case, blanks around)."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in MISSING or value.strip().lower() == "nan"
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def to_number(value, column: str = "?", row: int | str = "?") -> float | None:
    """A cell as a float, or None when missing; ValueError naming the row and column otherwise."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"row {row}, column {column!r}: {value!r} is not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"row {row}, column {column!r}: {value!r} is not a number") from None
    if math.isinf(number):
        raise ValueError(f"row {row}, column {column!r}: {value!r} is not a finite number")
    return number


def correlation(rows: Sequence[dict], x: str, y: str) -> dict:
    """Pearson and Spearman correlation of columns ``x`` and ``y`` over ``rows`` (dicts).

    Rows where either cell is absent, None, NaN, '' or 'N/A' are left out; ``n`` counts the rows
    used. With fewer than 3 usable rows, or a column constant over them, the four numbers are None
    and ``note`` says why (otherwise ``note`` is None). Returns
    ``{"x", "y", "n", "pearson", "pearson_p", "spearman", "spearman_p", "note"}``.
    """
    xs, ys = [], []
    for index, row in enumerate(rows):
        a, b = to_number(row.get(x), x, index), to_number(row.get(y), y, index)
        if a is not None and b is not None:
            xs.append(a)
            ys.append(b)
    out = {"x": x, "y": y, "n": len(xs), "pearson": None, "pearson_p": None,
           "spearman": None, "spearman_p": None, "note": None}
    if len(xs) < MIN_ROWS:
        out["note"] = f"only {len(xs)} rows with both values (need at least {MIN_ROWS})"
        return out
    constant = [name for name, values in ((x, xs), (y, ys)) if min(values) == max(values)]
    if constant:
        out["note"] = f"{' and '.join(repr(c) for c in constant)} constant over the {len(xs)} rows used"
        return out
    pearson = scipy_stats.pearsonr(xs, ys)
    spearman = scipy_stats.spearmanr(xs, ys)
    values = {"pearson": pearson.statistic, "pearson_p": pearson.pvalue,
              "spearman": spearman.statistic, "spearman_p": spearman.pvalue}
    for key, value in values.items():
        out[key] = None if value is None or math.isnan(float(value)) else float(value)
    if any(out[key] is None for key in values):
        out["note"] = "undefined (ties in the ranks of a column)"
    return out


def all_correlations(rows: Sequence[dict], columns: Sequence[str]) -> list[dict]:
    """``correlation`` of every unordered pair of ``columns``, in the order of ``columns``:
    (c0, c1), (c0, c2), ..., (c1, c2), ..."""
    return [correlation(rows, x, y) for x, y in itertools.combinations(columns, 2)]


def group_correlations(rows: Sequence[dict], keys: Sequence[str], x: str, y: str) -> list[dict]:
    """``correlation`` of ``x`` and ``y`` within each group of rows that share a value of one of
    ``keys``, for the keys whose value varies over the rows (a pooled correlation over groups
    whose values differ in kind, e.g. average- and max-pooled networks, can come from the gap
    between the groups alone). Groups of fewer than 3 rows are left out. Returns
    ``[{"group": "<key>=<value>", **correlation(...)}, ...]``, keys in order, values sorted."""
    out = []
    for key in keys:
        values = sorted({str(row.get(key)) for row in rows})
        if len(values) < 2:
            continue
        for value in values:
            group = [row for row in rows if str(row.get(key)) == value]
            if len(group) >= MIN_ROWS:
                out.append({"group": f"{key}={value}", **correlation(group, x, y)})
    return out


def average_precision(scores, mask) -> float:
    """Average precision of a map as a scorer of mask pixels: pixels ranked by score, mask pixels
    the positives (``binary_average_precision``, exact, no thresholds:
    ``AP = sum_k (R_k - R_(k-1)) P_k`` over the distinct score thresholds).

    ``scores`` [H, W] (or flat) and ``mask`` of the same number of elements (bool or 0/1). NaN for
    an empty or full mask, or scores holding NaN/inf. Scores are min-max scaled first, which keeps
    their order (torchmetrics would otherwise squash values outside [0, 1] with a sigmoid, which
    can merge distinct large scores into ties).
    """
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64) if isinstance(scores, np.ndarray) else scores)
    s = s.detach().to(torch.float64).flatten()
    m = torch.as_tensor(mask).detach()
    if m.numel() != s.numel():
        raise ValueError(f"average_precision: scores of shape {tuple(torch.as_tensor(scores).shape)} and "
                         f"mask of shape {tuple(m.shape)} differ in size")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask: must be boolean (or 0/1)")
        m = m.bool()
    m = m.flatten()
    positives = int(m.sum())
    if positives == 0 or positives == m.numel() or not bool(torch.isfinite(s).all()):
        return math.nan
    low, span = s.min(), s.max() - s.min()
    s = (s - low) / span if span > 0 else torch.zeros_like(s)
    return float(binary_average_precision(s, m.long()))


def mean_average_precision(maps, masks) -> float:
    """Mean of ``average_precision`` over images: ``maps [N, H, W]`` and ``masks [N, H, W]`` at the
    same resolution (upsample maps first, e.g. ``evaluation.metrics.functional.upsample``). Images
    whose AP is NaN (empty or full mask, non-finite map) are skipped; NaN when none is left."""
    s, m = torch.as_tensor(maps), torch.as_tensor(masks)
    if s.dim() != 3 or tuple(s.shape) != tuple(m.shape):
        raise ValueError(f"mean_average_precision: maps {tuple(s.shape)} and masks {tuple(m.shape)} "
                         "must both be [N, H, W] of the same shape")
    values = [average_precision(s[i], m[i]) for i in range(s.shape[0])]
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
