"""Report files of a checkpoint evaluation: report.json, report.csv and report.md.

Laid out like the paper: Table 1 (accuracy and explanation metrics, one row per checkpoint) and
Table 6 (top-1 under FGSM for each eps). Beside the localisation metrics, what a centred peak and
uniform noise score on the same trials (``evaluation.references``). report.json and report.csv
hold fractions in [0, 1], as the metrics give them; report.md, for people, prints percent and says
so.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from evaluation.references import REFERENCES


def _percent(value) -> str:
    """A fraction printed as percent with two decimals; '-' when missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


REFERENCE_LABELS = {"center": "centred peak", "noise": "uniform noise"}


def _table1_cells(results: dict, columns: list[tuple[str, str]]) -> list[str]:
    return [f"{_percent(results.get('spg'))} ± {_percent(results.get('spg_std'))}" if key == "spg"
            else _percent(results.get(key)) for key, _ in columns]


def row_label(row: dict) -> str:
    """A checkpoint's name in the tables and the picture, e.g. 'resnet18+GMP GC (lambda=1)'."""
    pooling = "+GMP" if row.get("pooling") == "max" else ""
    loss = f" GC (lambda={row['lambda']:g})" if row.get("loss") == "gc" else " baseline"
    return f"{row.get('model', '?')}{pooling}{loss}"


def table1_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, heading) of the Table 1 columns present in any row."""
    candidates = [("acc", "Top-1"), ("f1", "F1 overall"), ("f1_per_class", "F1 per class"), ("pg", "PG"), ("spg", "SPG"), ("ch", "CH"), ("nqh", "NQH")]
    return [(key, heading) for key, heading in candidates if any(key in row["results"] for row in rows)]


def fgsm_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row["results"].get("fgsm", {}) if key not in keys]
    return keys


def write_reports(rows: list[dict], out_dir: str | Path, settings: dict) -> dict[str, Path]:
    """Write the three report files for evaluated checkpoints ``rows`` (each with ``checkpoint``,
    model description and ``results``); returns their paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"report.{name}" for name in ("json", "csv", "md")}
    paths["json"].write_text(json.dumps({"settings": settings, "checkpoints": rows}, indent=2))

    columns = table1_columns(rows)
    eps_keys = fgsm_keys(rows)
    skipped_keys = sorted({key for row in rows for key in row["results"]["skipped"]})
    reference_keys = [f"{key}_{reference}" for reference in REFERENCES for key in ("pg", "spg", "spg_std", "ch")
                      if any(f"{key}_{reference}" in row["results"] for row in rows)]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["checkpoint", "model", "pooling", "loss", "lambda"] + [key for key, _ in columns]
                        + (["spg_std"] if any(key == "spg" for key, _ in columns) else []) + reference_keys
                        + [f"fgsm_{key}" for key in eps_keys] + [f"skipped_{key}" for key in skipped_keys])
        for row in rows:
            results = row["results"]
            writer.writerow([row["checkpoint"], row.get("model"), row.get("pooling"), row.get("loss"), row.get("lambda")]
                            + [results.get(key) for key, _ in columns]
                            + ([results.get("spg_std")] if any(key == "spg" for key, _ in columns) else [])
                            + [results.get(key) for key in reference_keys]
                            + [results.get("fgsm", {}).get(key) for key in eps_keys]
                            + [results["skipped"].get(key) for key in skipped_keys])

    lines = [f"# Explanation evaluation ({settings['explainer']} on {settings['data']})", ""]
    if columns:
        lines += ["Table 1: accuracy and explanation quality (%; NQH lower is better).", "",
                  "| model | " + " | ".join(heading for _, heading in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for row in rows:
            lines.append(f"| {row_label(row)} | " + " | ".join(_table1_cells(row["results"], columns)) + " |")
        # The reference maps do not depend on the model: the first checkpoint's trials stand for all
        # (every checkpoint is scored on the same trials).
        for reference, label in REFERENCE_LABELS.items():
            if f"pg_{reference}" in rows[0]["results"] or f"ch_{reference}" in rows[0]["results"]:
                results = {key: rows[0]["results"].get(f"{key}_{reference}") for key in ("pg", "spg", "spg_std", "ch")}
                lines.append(f"| reference: {label} | " + " | ".join(_table1_cells(results, columns)) + " |")
        lines.append("")
    if eps_keys:
        lines += ["Table 6: top-1 accuracy (%) under FGSM; eps in 1/255 units.", "",
                  "| model | " + " | ".join(eps_keys) + " |", "|---" * (len(eps_keys) + 1) + "|"]
        lines += [f"| {row_label(row)} | " + " | ".join(_percent(row['results']['fgsm'].get(key)) for key in eps_keys) + " |"
                  for row in rows]
        lines.append("")
    lines.append("Checkpoints:")
    lines += [f"- {row_label(row)}: `{row['checkpoint']}`; images left out (all-zero heatmap or empty mask): "
              f"{row['results']['skipped'] or 'none'}" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
