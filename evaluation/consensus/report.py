"""Correlations of a committee table: ``python -m evaluation.consensus.report table=FILE [output_dir=DIR]``.

The table (CSV, or tab-separated for ``.tsv`` and ``.txt``) has one row per model: a ``model``
column, an ``accuracy`` column, one or more ``*_score`` columns (consensus scores) and any number
of ``*_map`` columns (e.g. the mAP of each model's explanations against object masks); other
columns are kept but not correlated. Empty and ``N/A`` cells are missing: a row is left out of
each correlation that needs such a cell.

Writes to the output dir (default ``consensus_outputs/<date>/<time>/``, see
``conf/consensus_report.yaml``): ``correlations.json`` (``{"settings": ..., "correlations": [...]}``,
every pair among accuracy, scores and mAPs in the format of
``evaluation.consensus.stats.correlation``), ``correlations.md`` (the same as a table) and
``scatter_<column>.png`` for each score column (score on x, accuracy on y, one point per model,
labelled; of more than 12, only the extremes are).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated

import hydra
from matplotlib.figure import Figure
from omegaconf import DictConfig
from pydantic import BeforeValidator

from evaluation.consensus.stats import all_correlations, correlation, is_missing
from evaluation.figures import save_figure, subplots
from evaluation.tables import markdown_table, rounded
from gcmodels.config import check_config
from gcmodels.options import ConfigError, Options
from gcmodels.options import Sequence as OptionSequence

DELIMITERS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
MODEL, ACCURACY = "model", "accuracy"
SCORE_SUFFIX, MAP_SUFFIX = "_score", "_map"
# A scatter plot of more points than this labels only the extremes (and the named points): the
# labels of a large committee overprint one another.
MAX_LABELS = 12
# The points labelled at each end of each axis when the plot is large.
EXTREMES = 3


def score_columns(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c.endswith(SCORE_SUFFIX)]


def map_columns(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c.endswith(MAP_SUFFIX)]


def numeric_columns(columns: Sequence[str]) -> list[str]:
    """The columns that are correlated: accuracy, then the score columns, then the map columns."""
    return [ACCURACY] + score_columns(columns) + map_columns(columns)


def read_table(path: str | Path) -> tuple[list[dict], list[str]]:
    """Read a committee table; returns ``(rows, columns)``.

    Each row is a dict over ``columns`` (file order): ``model`` and unknown columns as stripped
    strings, ``accuracy``, ``*_score`` and ``*_map`` cells as floats, or None when the cell is
    empty or ``N/A``. ValueError naming the file and the problem: missing file, unknown extension,
    no ``model``/``accuracy``/``*_score`` column, a duplicate or empty column name, a row with
    the wrong number of cells, a cell that is not a number (with its line and column), no rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DELIMITERS:
        raise ValueError(f"table {path}: unknown extension {path.suffix!r}; use .csv (comma) or .tsv/.txt (tab)")
    if not path.is_file():
        raise ValueError(f"table {path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        lines = [(number, cells) for number, cells in enumerate(csv.reader(handle, delimiter=DELIMITERS[suffix]), 1)
                 if any(cell.strip() for cell in cells)]
    if not lines:
        raise ValueError(f"table {path}: the file is empty (no header)")
    _, header = lines[0]
    columns = [name.strip() for name in header]
    if any(not name for name in columns):
        raise ValueError(f"table {path}: an empty column name in the header {columns}")
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise ValueError(f"table {path}: duplicate columns {duplicates}")
    for required in (MODEL, ACCURACY):
        if required not in columns:
            raise ValueError(f"table {path}: no {required!r} column (columns: {columns})")
    if not score_columns(columns):
        raise ValueError(f"table {path}: no '*{SCORE_SUFFIX}' column (columns: {columns})")
    numeric = set(numeric_columns(columns))
    rows = []
    for number, cells in lines[1:]:
        if len(cells) != len(columns):
            raise ValueError(f"table {path}: line {number} has {len(cells)} cells, the header has {len(columns)}")
        row = {}
        for name, cell in zip(columns, cells):
            cell = cell.strip()
            if name not in numeric:
                row[name] = cell
            elif is_missing(cell):
                row[name] = None
            else:
                try:
                    value = float(cell)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise ValueError(f"table {path}: line {number} (model {cells[columns.index(MODEL)].strip()!r}), "
                                     f"column {name!r}: {cell!r} is not a number (leave it empty or N/A if missing)")
                row[name] = value
        rows.append(row)
    if not rows:
        raise ValueError(f"table {path}: no data rows under the header")
    return rows, columns


def correlation_title(result: dict) -> str:
    """'Pearson r=0.810, Spearman rho=0.780, n=81' (or the note when undefined)."""
    if result["pearson"] is None:
        return f"n={result['n']}: {result['note']}"
    return (f"Pearson r={result['pearson']:.3f} (p={rounded(result['pearson_p'])}), "
            f"Spearman rho={result['spearman']:.3f} (p={rounded(result['spearman_p'])}), n={result['n']}")


def labelled(points: Sequence[tuple[str, float, float]], named: Collection[str] = ()) -> set[int]:
    """Indices of the points to label: all of up to ``MAX_LABELS`` points; of more, the
    ``EXTREMES`` highest and lowest on each axis and those whose label is in ``named``."""
    if len(points) <= MAX_LABELS:
        return set(range(len(points)))
    chosen = {i for i, (label, _, _) in enumerate(points) if label in named}
    for axis in (1, 2):
        order = sorted(range(len(points)), key=lambda i: points[i][axis])
        chosen.update(order[:EXTREMES] + order[-EXTREMES:])
    return chosen


def scatter_figure(points: Sequence[tuple[str, float | None, float | None]], x_label: str, y_label: str,
                   title: str, named: Collection[str] = ()) -> Figure:
    """A scatter plot of ``points`` ``(label, x, y)``, labelled as ``labelled`` says (every point is
    drawn); points with a missing coordinate (None/NaN) are left out."""
    kept = [(label, float(x), float(y)) for label, x, y in points
            if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    fig, ax = subplots(figsize=(6.4, 4.8))
    if kept:
        ax.scatter([x for _, x, _ in kept], [y for _, _, y in kept], s=18, color="tab:blue")
        shown = labelled(kept, named)
        for index in sorted(shown):
            label, x, y = kept[index]
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if len(shown) < len(kept):
            x_label += f"\n(labelled: the {EXTREMES} highest and lowest on each axis"
            x_label += ", and the named points)" if named else ")"
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def scatter(points: Sequence[tuple[str, float | None, float | None]], x_label: str, y_label: str,
            title: str, path: str | Path, named: Collection[str] = ()) -> Path:
    """Save ``scatter_figure`` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = scatter_figure(points, x_label, y_label, title, named)
    save_figure(fig, path, dpi=120)
    return path


def _markdown(correlations: list[dict], settings: dict) -> str:
    lines = [f"# Correlations of {settings.get('table', 'the committee table')}", "",
             f"{settings.get('rows', '?')} models. Rows with an empty or N/A cell are left out of the "
             "correlations that need it; n is the number of rows used. p: two-sided p-values.", ""]
    lines += markdown_table(
        ["x", "y", "n", "Pearson r", "p", "Spearman rho", "p", "note"],
        ([c["x"], c["y"], c["n"], *(rounded(c[key]) for key in ("pearson", "pearson_p", "spearman", "spearman_p")),
          c["note"] or ""] for c in correlations),
        align=["---", "---", "---:", "---:", "---:", "---:", "---:", "---"])
    return "\n".join(lines) + "\n"


def _safe_name(column: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in column)


def write_table_report(rows: Sequence[dict], columns: Sequence[str], out_dir: str | Path,
                       settings: dict | None = None, named: Collection[str] = ()) -> dict[str, Path]:
    """Write ``correlations.json``, ``correlations.md`` and ``scatter_<score column>.png`` for a
    table read by ``read_table``; ``settings`` (e.g. the table's path) go into the json and the
    title; ``named``: models the scatter plots label whatever the committee's size. Returns
    ``{"json": ..., "md": ..., "scatter_<column>": ...}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    correlated = numeric_columns(columns)
    settings = {**(settings or {}), "rows": len(rows), "columns": correlated,
                "score_columns": score_columns(columns), "map_columns": map_columns(columns)}
    correlations = all_correlations(rows, correlated)
    paths = {"json": out_dir / "correlations.json", "md": out_dir / "correlations.md"}
    paths["json"].write_text(json.dumps({"settings": settings, "correlations": correlations}, indent=2))
    paths["md"].write_text(_markdown(correlations, settings))
    for column in score_columns(columns):
        result = correlation(rows, column, ACCURACY)
        points = [(str(row.get(MODEL, "?")), row.get(column), row.get(ACCURACY)) for row in rows]
        paths[f"scatter_{column}"] = scatter(points, column, ACCURACY, f"{column} vs {ACCURACY}\n"
                                             f"{correlation_title(result)}",
                                             out_dir / f"scatter_{_safe_name(column)}.png", named)
    return paths


def run(table: str | Path, output_dir: str | Path, label: Collection[str] = ()) -> dict[str, Path]:
    """Read ``table`` and write its report into ``output_dir`` (``label``: models to label in the
    scatter plots besides the extremes; each must be in the table); returns the written paths."""
    rows, columns = read_table(table)
    unknown = sorted(set(label) - {str(row.get(MODEL)) for row in rows})
    if unknown:
        raise ConfigError([("label", f"{unknown} are not in the table's {MODEL} column")])
    return write_table_report(rows, columns, output_dir, {"table": str(table), "label": list(label)}, label)


def _model_name(value):
    # A model column of numbers: label=[18] names the model "18".
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ReportConfig(Options):
    """The schema of ``conf/consensus_report.yaml``: the table's path, the models to label (a
    model column of numbers gives numbers on the command line) and the output dir."""

    table: str
    label: OptionSequence[Annotated[str, BeforeValidator(_model_name)]]
    output_dir: str


@hydra.main(version_base="1.3", config_path="../../conf", config_name="consensus_report")
def main(cfg: DictConfig) -> None:
    config: ReportConfig = check_config(cfg, ReportConfig)
    paths = run(config.table, config.output_dir, config.label)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
