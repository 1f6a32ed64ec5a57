"""The one way report tables are written: markdown tables and the formatting of their cells
(fractions as percent, numbers, missing values as '-'). Every report (report.md, consensus.md,
correlations.md, the reproduction's report.md) goes through it."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

MISSING = "-"


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def percent(value: float | None, digits: int = 2) -> str:
    """A fraction in percent, ``digits`` decimals; '-' when missing."""
    return MISSING if is_missing(value) else f"{100 * value:.{digits}f}"


def number(value: float | None, spec: str = ".4f") -> str:
    """A number in ``format`` ``spec``; '-' when missing (None: undefined, e.g. a constant column's
    correlation)."""
    return MISSING if is_missing(value) else format(value, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                   align: Sequence[str] | None = None) -> list[str]:
    """A markdown table's lines: ``header``, then each row's cells as text. ``align``: each
    column's separator (``"---"``, ``"---:"`` right-aligned); left-aligned by default."""
    separators = align if align is not None else ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(separators) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def rounded(value: float | None, digits: int = 3) -> str:
    """``digits`` decimals, or scientific notation where that would print a non-zero value as 0
    (a p-value of 1e-6); '-' when missing."""
    if is_missing(value):
        return MISSING
    return f"{value:.1e}" if value != 0 and abs(value) < 10 ** -digits else f"{value:.{digits}f}"
