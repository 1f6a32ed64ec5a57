"""Consensus statistics and the table report (evaluation.consensus.stats, evaluation.consensus.report):
correlations equal scipy's, missing cells are dropped and counted, correlations within groups,
average precision by hand, the report end-to-end on a CSV and a TSV, scatter labels, and every bad
input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from scipy import stats as scipy_stats

from evaluation.consensus.report import EXTREMES, read_table, run, scatter, scatter_figure, write_table_report
from evaluation.consensus.stats import (
    all_correlations,
    average_precision,
    correlation,
    group_correlations,
    mean_average_precision,
)
from gcmodels.options import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CORRELATION_KEYS = {"x", "y", "n", "pearson", "pearson_p", "spearman", "spearman_p", "note"}

ROWS = [
    {"model": "a", "accuracy": 0.70, "lime_score": 0.51, "lime_map": 0.40},
    {"model": "b", "accuracy": 0.75, "lime_score": 0.58, "lime_map": 0.41},
    {"model": "c", "accuracy": 0.72, "lime_score": 0.60, "lime_map": None},
    {"model": "d", "accuracy": 0.80, "lime_score": 0.66, "lime_map": 0.47},
    {"model": "e", "accuracy": 0.78, "lime_score": 0.62, "lime_map": 0.45},
    {"model": "f", "accuracy": 0.66, "lime_score": "N/A", "lime_map": 0.30},
]


# ---------------------------------------------------------------- correlations
def test_correlation_equals_scipy():
    used = [r for r in ROWS if r["lime_score"] != "N/A"]
    x = [r["lime_score"] for r in used]
    y = [r["accuracy"] for r in used]
    out = correlation(ROWS, "lime_score", "accuracy")
    assert set(out) == CORRELATION_KEYS
    assert out["x"] == "lime_score" and out["y"] == "accuracy" and out["n"] == 5 and out["note"] is None
    assert out["pearson"] == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    assert out["pearson_p"] == pytest.approx(scipy_stats.pearsonr(x, y).pvalue, abs=1e-12)
    assert out["spearman"] == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert out["spearman_p"] == pytest.approx(scipy_stats.spearmanr(x, y).pvalue, abs=1e-12)


def test_missing_cells_are_dropped_and_counted():
    # lime_map is None in row c, lime_score N/A in row f: 4 rows have both.
    out = correlation(ROWS, "lime_score", "lime_map")
    assert out["n"] == 4
    x, y = [0.51, 0.58, 0.66, 0.62], [0.40, 0.41, 0.47, 0.45]
    assert out["pearson"] == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    rows = [{"a": 1, "b": 2}, {"a": math.nan, "b": 3}, {"a": "", "b": 4}, {"a": 2.0, "b": None},
            {"a": "3", "b": "5"}, {"b": 6}, {"a": 4, "b": 7}]
    out = correlation(rows, "a", "b")
    assert out["n"] == 3
    assert out["pearson"] == pytest.approx(scipy_stats.pearsonr([1, 3, 4], [2, 5, 7]).statistic)


def test_too_few_rows_or_constant_give_none():
    few = correlation(ROWS[:2], "lime_score", "accuracy")
    assert few["n"] == 2 and few["pearson"] is None and few["spearman_p"] is None and "2 rows" in few["note"]
    flat = correlation([{"x": 1, "y": v} for v in (1, 2, 3)], "x", "y")
    assert flat["n"] == 3 and flat["pearson"] is None and flat["spearman"] is None and "constant" in flat["note"]


def test_group_correlations_within_each_varying_key():
    """Two groups whose pooled correlation comes from the gap between them: within each, the
    score and accuracy run the other way."""
    rows = [{"pooling": "avg", "loss": "gc", "accuracy": 0.9 - 0.01 * i, "consensus_score": 0.8 + 0.01 * i}
            for i in range(4)]
    rows += [{"pooling": "max", "loss": "gc", "accuracy": 0.5 - 0.01 * i, "consensus_score": 0.3 + 0.01 * i}
             for i in range(3)]
    rows.append({"pooling": "lse", "loss": "gc", "accuracy": 0.7, "consensus_score": 0.5})  # a group of 1
    assert correlation(rows, "consensus_score", "accuracy")["pearson"] > 0.9
    groups = group_correlations(rows, ["pooling", "loss"], "consensus_score", "accuracy")
    assert [g["group"] for g in groups] == ["pooling=avg", "pooling=max"]  # loss does not vary; lse alone
    for group, members in zip(groups, (rows[:4], rows[4:7])):
        assert set(group) == CORRELATION_KEYS | {"group"} and group["n"] == len(members)
        assert group["pearson"] == pytest.approx(correlation(members, "consensus_score", "accuracy")["pearson"])
        assert group["pearson"] == pytest.approx(-1.0)


def test_a_large_scatter_labels_its_extremes_and_the_named_points():
    small = [(f"m{i}", 0.1 * i, 0.5) for i in range(12)]
    figure = scatter_figure(small, "x", "y", "t")
    assert len(figure.axes[0].texts) == 12
    plt.close(figure)
    # 81 points: the 3 lowest and highest on x (m0-m2, m78-m80) and on y (m41-m43 lowest, m0-m2
    # highest), and one named point.
    points = [(f"m{i}", float(i), float(abs(i - 42) + 0.5 * (i > 42))) for i in range(81)]
    figure = scatter_figure(points, "x", "y", "t", named={"m60"})
    shown = {text.get_text() for text in figure.axes[0].texts}
    assert shown == {"m0", "m1", "m2", "m78", "m79", "m80", "m41", "m42", "m43", "m60"}
    assert len(figure.axes[0].collections[0].get_offsets()) == 81  # every point drawn
    assert f"the {EXTREMES} highest and lowest" in figure.axes[0].get_xlabel()
    plt.close(figure)


def test_the_table_report_labels_the_models_it_is_told_to(tmp_path):
    table = tmp_path / "committee.csv"
    table.write_text("model,accuracy,x_score\n" + "".join(f"m{i},{i / 100},{i}\n" for i in range(20)))
    seen = []
    original = plt.Figure.savefig

    def record(figure, *args, **kwargs):
        seen.append({text.get_text() for text in figure.axes[0].texts})
        return original(figure, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", record)
        run(table, tmp_path / "out", label=["m10"])
    assert seen == [{"m0", "m1", "m2", "m17", "m18", "m19", "m10"}]
    with pytest.raises(ConfigError) as err:
        run(table, tmp_path / "out", label=["m99", "m10"])
    assert err.value.keys == ["label"] and "['m99']" in str(err.value)


def test_all_correlations_pairs():
    out = all_correlations(ROWS, ["accuracy", "lime_score", "lime_map"])
    assert [(c["x"], c["y"]) for c in out] == [("accuracy", "lime_score"), ("accuracy", "lime_map"),
                                              ("lime_score", "lime_map")]
    assert [c["n"] for c in out] == [5, 5, 4]


def test_correlation_rejects_text():
    with pytest.raises(ValueError, match="column 'x'"):
        correlation([{"x": "high", "y": 1}], "x", "y")


# ---------------------------------------------------------------- average precision
def test_average_precision_by_hand():
    # Ranked: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): AP = 0.5 * 1 + 0.5 * 2/3.
    scores = torch.tensor([[0.1, 0.4], [0.35, 0.8]])
    mask = torch.tensor([[False, False], [True, True]])
    assert average_precision(scores, mask) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(scores.flatten(), mask.flatten().long()) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Large raw scores keep their order (no sigmoid saturation).
    assert average_precision(scores * 1000 + 50, mask) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0])) == pytest.approx(1.0)
    assert average_precision(torch.ones(4), torch.tensor([1, 0, 0, 0])) == pytest.approx(0.25)  # all tied
    assert math.isnan(average_precision(scores, torch.zeros(2, 2, dtype=torch.bool)))  # empty mask
    assert math.isnan(average_precision(scores, torch.ones(2, 2, dtype=torch.bool)))  # full mask


def test_mean_average_precision_skips_nan():
    maps = torch.tensor([[[0.1, 0.4], [0.35, 0.8]], [[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.2], [0.1, 0.0]]])
    masks = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.bool)
    assert mean_average_precision(maps, masks) == pytest.approx((0.5 + 0.5 * 2 / 3 + 1.0) / 2)
    with pytest.raises(ValueError, match="same shape"):
        mean_average_precision(maps, masks[:, :1])
    with pytest.raises(ValueError, match="differ in size"):
        average_precision(maps[0], masks[0, :1])


# ---------------------------------------------------------------- the table report
CSV = """model,accuracy,lime_score,smoothgrad_score,lime_map,notes
resnet18,0.70,0.51,0.30,0.40,x
resnet50,0.76,0.58,0.35,0.44,
vgg16,0.72,0.60,,0.41,y
densenet,0.78,0.63,0.39,N/A,
alexnet,0.57,0.40,0.22,0.30,z
"""


def check_report(out: Path, n_correlations: int, score_columns: list[str]) -> dict:
    report = json.loads((out / "correlations.json").read_text())
    assert set(report) == {"settings", "correlations"}
    assert set(report["settings"]) == {"table", "label", "rows", "columns", "score_columns", "map_columns"}
    assert len(report["correlations"]) == n_correlations
    assert all(set(c) == CORRELATION_KEYS for c in report["correlations"])
    md = (out / "correlations.md").read_text()
    assert "| x | y | n |" in md
    for column in score_columns:
        assert (out / f"scatter_{column}.png").stat().st_size > 0
    return report


def test_report_csv(tmp_path):
    table = tmp_path / "committee.csv"
    table.write_text(CSV)
    rows, columns = read_table(table)
    assert columns == ["model", "accuracy", "lime_score", "smoothgrad_score", "lime_map", "notes"]
    assert rows[2]["smoothgrad_score"] is None and rows[3]["lime_map"] is None and rows[0]["notes"] == "x"
    paths = run(table, tmp_path / "out")
    assert set(paths) == {"json", "md", "scatter_lime_score", "scatter_smoothgrad_score"}
    report = check_report(tmp_path / "out", 6, ["lime_score", "smoothgrad_score"])
    assert report["settings"] == {"table": str(table), "label": [], "rows": 5,
                                  "columns": ["accuracy", "lime_score", "smoothgrad_score", "lime_map"],
                                  "score_columns": ["lime_score", "smoothgrad_score"], "map_columns": ["lime_map"]}
    by_pair = {(c["x"], c["y"]): c for c in report["correlations"]}
    assert by_pair[("accuracy", "lime_score")]["n"] == 5
    assert by_pair[("accuracy", "smoothgrad_score")]["n"] == 4  # the empty cell
    assert by_pair[("smoothgrad_score", "lime_map")]["n"] == 3  # the empty cell and the N/A
    acc = [0.70, 0.76, 0.72, 0.78, 0.57]
    lime = [0.51, 0.58, 0.60, 0.63, 0.40]
    assert by_pair[("accuracy", "lime_score")]["pearson"] == pytest.approx(scipy_stats.pearsonr(acc, lime).statistic)
    assert "| accuracy | smoothgrad_score | 4 |" in (tmp_path / "out" / "correlations.md").read_text()


@pytest.mark.slow  # a subprocess
def test_report_tsv_command_line(tmp_path):
    table = tmp_path / "committee.tsv"
    table.write_text("model\taccuracy\tgradcam_score\tgradcam_map\n"
                     "m1\t0.61\t0.40\t0.30\nm2\t0.65\tN/A\t0.33\nm3\t0.70\t0.52\t0.35\nm4\t0.74\t0.55\t0.41\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "evaluation.consensus.report", f"table={table}",
                             f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", "label=[m2]"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = check_report(out, 3, ["gradcam_score"])
    assert report["settings"]["label"] == ["m2"]
    by_pair = {(c["x"], c["y"]): c for c in report["correlations"]}
    assert by_pair[("accuracy", "gradcam_score")]["n"] == 3
    assert by_pair[("accuracy", "gradcam_map")]["n"] == 4
    assert "correlations.json" in result.stdout


def test_txt_is_tab_separated_and_scatter(tmp_path):
    table = tmp_path / "committee.txt"
    table.write_text("model\taccuracy\tx_score\na\t0.5\t0.1\nb\t0.6\t0.2\n")
    rows, _ = read_table(table)
    assert rows == [{"model": "a", "accuracy": 0.5, "x_score": 0.1}, {"model": "b", "accuracy": 0.6, "x_score": 0.2}]
    paths = write_table_report(rows, ["model", "accuracy", "x_score"], tmp_path / "out")
    report = json.loads(paths["json"].read_text())
    assert report["correlations"][0]["pearson"] is None and report["correlations"][0]["n"] == 2
    path = scatter([("a", 0.1, 0.5), ("b", None, 0.6), ("c", math.nan, 0.7)], "x", "y", "title", tmp_path / "s.png")
    assert path.stat().st_size > 0


@pytest.mark.parametrize("name, text, message", [
    ("missing.csv", None, "file not found"),
    ("table.xlsx", "model,accuracy,a_score\n", "unknown extension '.xlsx'"),
    ("table.csv", "name,accuracy,a_score\nm,0.5,0.1\n", "no 'model' column"),
    ("table.csv", "model,acc,a_score\nm,0.5,0.1\n", "no 'accuracy' column"),
    ("table.csv", "model,accuracy,a_map\nm,0.5,0.1\n", "no '*_score' column"),
    ("table.csv", "model,accuracy,a_score\nm1,0.5,0.1\nm2,0.6,high\n", "line 3 (model 'm2'), column 'a_score': 'high'"),
    ("table.tsv", "model\taccuracy\ta_score\nm1\t70%\t0.1\n", "line 2 (model 'm1'), column 'accuracy': '70%'"),
    ("table.csv", "model,accuracy,a_score\nm1,0.5\n", "line 2 has 2 cells"),
    ("table.csv", "model,accuracy,a_score\n", "no data rows"),
    ("table.csv", "", "empty"),
])
def test_bad_tables(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_table(path)
    assert message in str(error.value) and str(path) in str(error.value)
