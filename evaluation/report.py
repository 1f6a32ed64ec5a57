"""Report files of a checkpoint evaluation: report.json, report.csv and report.md.

Laid out like the paper: Table 1 (accuracy and explanation metrics, one row per checkpoint) and
Table 6 (top-1 under FGSM for each eps), with the attack's success rate among the images correct
before it beside Table 6; then the faithfulness table (insertion, deletion, ROAD, each with the
other-image baseline, and the randomisation check with its verdict), its settings printed above it.
Beside the localisation metrics, what a centred peak and uniform noise
score on the same trials (``evaluation.references``); under the authors' protocol, also how many
trials an all-zero map left out or had scored as uniform (``evaluation.zero_maps``), since their
scripts score every such map. report.json and report.csv hold fractions in [0, 1], as the metrics
give them; report.md, for people, prints percent and says so.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from evaluation.metrics import registry
from evaluation.references import REFERENCES
from evaluation.tables import markdown_table, percent
from gcmodels.checkpoints import checkpoint_label

REFERENCE_LABELS = {"center": "centred peak", "noise": "uniform noise"}
FAITHFULNESS_FAMILIES = ("faithfulness", "randomisation")
# Where a faithfulness metric's score is the base of an other-image baseline (see
# evaluation.metrics.faithfulness): the others' score and the excess over them follow it.
BASELINE_SUFFIXES = ("", "_others", "_minus_others")
HEADINGS = {"insertion": "Insertion", "deletion": "Deletion", "road_morf": "ROAD MoRF", "road_lerf": "ROAD LeRF",
            "mprt": "MPRT rank corr.", "mprt_unchanged": "MPRT unchanged steps"}


def reference_results(results: dict, reference: str) -> dict:
    """The results a reference map got (``<key>_<reference>``), under the explainer's keys."""
    suffix = f"_{reference}"
    return {key.removesuffix(suffix): value for key, value in results.items() if key.endswith(suffix)}


def faithfulness_keys(rows: list[dict]) -> list[str]:
    """The faithfulness scores of the registered metrics present in any row, each base score
    followed by its others' score and its excess over them."""
    keys = []
    for spec in registry.METRICS.values():
        if spec.family not in FAITHFULNESS_FAMILIES:
            continue
        for name in spec.scores:
            if name.endswith("_minus_others"):
                continue
            suffixes = BASELINE_SUFFIXES if f"{name}_minus_others" in spec.scores else ("",)
            keys += [f"{name}{suffix}" for suffix in suffixes]
    return [key for key in keys if any(key in row["results"] for row in rows)]


def precision_words(settings: dict) -> str:
    """The arithmetic of the passes without gradients (``evaluation.precision``), in words."""
    precision = settings.get("precision", "32")
    return "float32" if precision == "32" else precision


def faithfulness_settings(settings: dict, keys: list[str]) -> str:
    """The settings that decide whether a faithfulness number compares with another, in words."""
    score = settings.get("faithfulness_score")
    parts = []
    if any(key.startswith(("insertion", "deletion")) for key in keys):
        parts.append(f"insertion and deletion: {settings.get('perturbation_steps')} equal steps of the pixels ranked "
                     f"by the map (ties in a seeded random order), substrate {settings.get('insertion_substrate')} "
                     f"(insertion; blur = Gaussian kernel 11, sigma 5) and {settings.get('deletion_substrate')} "
                     f"(deletion), AUC over the fraction of pixels")
    if any(key.startswith("road") for key in keys):
        parts.append(f"ROAD: {list(settings.get('road_percentages', []))} % removed by noisy linear imputation "
                     f"(noise {settings.get('road_noise')}), area = the curve's mean height over those percentages")
    if any(not key.startswith("mprt") for key in keys):
        parts.append(f"score: {score} of the explained class, forward passes in {precision_words(settings)}; "
                     f"others: the maps of {settings.get('other_images')} other validation images on the same image")
    if any(key.startswith("mprt") for key in keys):
        parts.append(f"MPRT: {settings.get('mprt_variant')} randomisation from the logits down, Spearman rank "
                     f"correlation of |map| with the original, a step unchanged at >= {settings.get('mprt_threshold')}")
    return "Settings: " + "; ".join(parts) + "."


def faithfulness_heading(key: str) -> str:
    for suffix, words in (("_minus_others", " - others"), ("_others", " (others)")):
        if key.endswith(suffix):
            return HEADINGS.get(key.removesuffix(suffix), key) + words
    return HEADINGS.get(key, key)


def mprt_verdict(results: dict, threshold: float | None) -> str:
    """Whether the randomisation check passes: every step changed the maps (mean rank correlation
    below the threshold), or which blocks left them unchanged."""
    curve = results.get("mprt_spearman_abs", {})
    unchanged = [block for block, value in curve.items() if threshold is not None and value >= threshold]
    if not unchanged:
        return "passes: the maps changed at every step of the randomisation"
    return (f"FAILS: the maps kept a rank correlation >= {threshold} with the original after randomising up to "
            f"block(s) {', '.join(unchanged)}")


def faithfulness_lines(rows: list[dict], settings: dict) -> list[str]:
    """report.md's faithfulness table (percent for the scores in [0, 1], as Table 1), with its
    settings and, under MPRT, each checkpoint's verdict."""
    keys = faithfulness_keys(rows)
    if not keys:
        return []
    in_percent = [key for key in keys if key != "mprt_unchanged" and not key.startswith("mprt")]
    logit = settings.get("faithfulness_score") == "logit"

    def cell(results: dict, key: str) -> str:
        value = results.get(key)
        if key in in_percent and not logit:
            return percent(value)
        return "-" if value is None else f"{value:.3f}" if key != "mprt_unchanged" else f"{value:.0f}"

    unit = "logits" if logit else "%"
    lines = [f"Faithfulness ({unit}; deletion and ROAD MoRF lower is better, the rest higher, MPRT lower). "
             f"'- others': the score minus that of other images' maps on the same images: the part owed to the map "
             f"being this image's.", "", faithfulness_settings(settings, keys), ""]
    table = [[checkpoint_label(row), *(cell(row["results"], key) for key in keys)] for row in rows]
    for reference, label in REFERENCE_LABELS.items():
        scored = reference_results(rows[0]["results"], reference)
        if any(key in scored for key in keys):
            table.append([f"reference: {label}", *(cell(scored, key) for key in keys)])
    lines += markdown_table(["model", *(faithfulness_heading(key) for key in keys)], table) + [""]
    if any("mprt" in row["results"] for row in rows):
        lines += ["Randomisation check (Adebayo et al. 2018):", ""]
        lines += [f"- {checkpoint_label(row)}: {mprt_verdict(row['results'], settings.get('mprt_threshold'))}"
                  for row in rows if "mprt" in row["results"]]
        lines.append("")
    return lines


def _table1_cell(results: dict, key: str, spread: bool) -> str:
    """A score in percent (``spread``: with ± ``<key>_std``, SPG's over runs), or a count of
    ``group/name`` (``skipped/pg``)."""
    if "/" in key:
        group, name = key.split("/")
        count = results.get(group, {}).get(name)
        return "-" if count is None else str(count)
    if spread:
        return f"{percent(results.get(key))} ± {percent(results.get(f'{key}_std'))}"
    return percent(results.get(key))


def _table1_cells(results: dict, columns: list[tuple[str, str]], spreads: set[str]) -> list[str]:
    return [_table1_cell(results, key, key in spreads) for key, _ in columns]


def table1_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, heading) of the registered metrics' Table 1 columns present in any row."""
    return [(key, heading) for key, heading in registry.table1_columns()
            if any(key in row["results"] for row in rows)]


def zero_map_columns(columns: list[tuple[str, str]], zero_maps: str) -> tuple[list[tuple[str, str]], str]:
    """``columns`` with, after each localisation metric's (PG, SPG, CH), the count of its trials
    whose map was all zero: left out (``skip``; with those of an empty mask) or scored as uniform;
    and the table's note."""
    if zero_maps == "uniform":
        group, label = "zero_maps_uniform", "as uniform"
        note = ("Beside PG, SPG and CH: the trials whose all-zero heatmap was scored as a uniform map, as the "
                "authors' +1e-8 does (evaluation.zero_maps=uniform).")
    else:
        group, label = "skipped", "skipped"
        note = ("Beside PG, SPG and CH: the trials left out (all-zero heatmap or empty mask); the authors' "
                "scripts score an all-zero heatmap as a uniform map (+1e-8), as evaluation.zero_maps=uniform does.")
    widened = []
    for key, heading in columns:
        widened.append((key, heading))
        spec = registry.column_metric(key)
        if spec.family == "localization" and key == spec.name:  # not beside PG (difficult): PG's count
            widened.append((f"{group}/{spec.name}", f"{heading} {label}"))
    return widened, note


def _spreads(rows: list[dict]) -> set[str]:
    """The scores whose spread the rows hold as ``<key>_std`` (SPG's over runs)."""
    return {key.removesuffix("_std") for row in rows for key in row["results"] if key.endswith("_std")}


def fgsm_keys(rows: list[dict], group: str = "fgsm") -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row["results"].get(group, {}) if key not in keys]
    return keys


def _eps_table(rows: list[dict], group: str, keys: list[str], first: tuple[str, str] | None = None) -> list[str]:
    """One row per checkpoint of ``results[group][eps key]`` in percent, after the column ``first``
    (its key in the results, its heading) where given."""
    headings = ([first[1]] if first else []) + keys
    return markdown_table(["model", *headings], (
        [checkpoint_label(row), *([percent(row["results"].get(first[0]))] if first else []),
         *(percent(row["results"].get(group, {}).get(key)) for key in keys)] for row in rows))


def write_reports(rows: list[dict], out_dir: str | Path, settings: dict) -> dict[str, Path]:
    """Write the three report files for evaluated checkpoints ``rows`` (each with ``checkpoint``,
    model description and ``results``); returns their paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"report.{name}" for name in ("json", "csv", "md")}
    paths["json"].write_text(json.dumps({"settings": settings, "checkpoints": rows}, indent=2))

    columns = table1_columns(rows)
    eps_keys = fgsm_keys(rows)
    success_keys = fgsm_keys(rows, "fgsm_success")
    skipped_keys = sorted({key for row in rows for key in row["results"]["skipped"]})
    uniform_keys = sorted({key for row in rows for key in row["results"].get("zero_maps_uniform", {})})
    clean = ["fgsm_clean"] if any("fgsm_clean" in row["results"] for row in rows) else []
    spreads = _spreads(rows)
    table1_keys = [name for key, _ in columns for name in (key, f"{key}_std") if name == key or key in spreads]
    faithful = faithfulness_keys(rows)
    reference_keys = [f"{key}_{reference}" for reference in REFERENCES for key in table1_keys + faithful
                      if any(f"{key}_{reference}" in row["results"] for row in rows)]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["checkpoint", "model", "pooling", "loss", "lambda"] + table1_keys + faithful + reference_keys
                        + [f"fgsm_{key}" for key in eps_keys] + clean + [f"fgsm_success_{key}" for key in success_keys]
                        + [f"skipped_{key}" for key in skipped_keys]
                        + [f"zero_maps_uniform_{key}" for key in uniform_keys])
        for row in rows:
            results = row["results"]
            writer.writerow([row["checkpoint"], row.get("model"), row.get("pooling"), row.get("loss"),
                             row.get("lambda")]
                            + [results.get(key) for key in table1_keys + faithful + reference_keys]
                            + [results.get("fgsm", {}).get(key) for key in eps_keys]
                            + [results.get(key) for key in clean]
                            + [results.get("fgsm_success", {}).get(key) for key in success_keys]
                            + [results["skipped"].get(key) for key in skipped_keys]
                            + [results.get("zero_maps_uniform", {}).get(key) for key in uniform_keys])

    lines = [f"# Explanation evaluation ({settings['explainer']} on {settings['data']})", ""]
    if settings.get("masks"):
        lines += [f"Localisation masks: {settings['masks']}.", ""]
    if "processes" in settings:
        lines += [f"Run: {settings['processes']} process(es); passes without gradients in "
                  f"{precision_words(settings)}; networks in "
                  f"{'channels_last' if settings.get('channels_last') else 'contiguous (NCHW)'} memory.", ""]
    if columns:
        lines += ["Table 1: accuracy and explanation quality (%; NQH lower is better).", ""]
        shown = columns
        if settings.get("protocol") == "authors" and any(registry.column_metric(key).family == "localization"
                                                         for key, _ in columns):
            shown, note = zero_map_columns(columns, settings.get("zero_maps", "skip"))
            lines += [note, ""]
        table = [[checkpoint_label(row), *_table1_cells(row["results"], shown, spreads)] for row in rows]
        # The reference maps do not depend on the model: the first checkpoint's trials stand for all
        # (every checkpoint is scored on the same trials).
        first = rows[0]["results"]
        for reference, label in REFERENCE_LABELS.items():
            if any(f"{key}_{reference}" in first for key, _ in columns):
                results = {key: first.get(f"{key}_{reference}") for key in table1_keys}
                table.append([f"reference: {label}", *_table1_cells(results, shown, spreads)])
        lines += markdown_table(["model", *(heading for _, heading in shown)], table) + [""]
    lines += faithfulness_lines(rows, settings)
    if eps_keys:
        lines += ["Table 6: top-1 accuracy (%) under FGSM; eps in 1/255 units.", ""]
        lines += _eps_table(rows, "fgsm", eps_keys) + [""]
    if success_keys:
        lines += ["Attack success rate (%) under FGSM among the images classified correctly before the attack "
                  "(lower is better), beside their clean top-1; eps in 1/255 units.", ""]
        lines += _eps_table(rows, "fgsm_success", success_keys, ("fgsm_clean", "clean top-1")) + [""]
    lines.append("Checkpoints:")
    for row in rows:
        results = row["results"]
        uniform = (f"; all-zero heatmaps scored as uniform: {results['zero_maps_uniform']}"
                   if "zero_maps_uniform" in results else "")
        skipped = {name: count for name, count in results["skipped"].items() if name != "mprt"}
        constant = (f"; randomised maps left out of the rank correlations (constant): {results['skipped']['mprt']}"
                    if "mprt" in results["skipped"] else "")
        lines.append(f"- {checkpoint_label(row)}: `{row['checkpoint']}`; images left out (all-zero heatmap or empty "
                     f"mask): {skipped or 'none'}{uniform}{constant}")
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
