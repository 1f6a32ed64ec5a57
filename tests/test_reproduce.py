"""The one-command reproduction: claim statistics (t interval, sign test, verdicts, seeds needed)
and FGSM retention against hand computations, and the whole command on tiny data, rerun to show that
finished steps are reused and that other settings never mix with them."""
import json
import math
import subprocess
import sys

import pytest

from gcmodels.options import ConfigError
from reproduce import (
    claims,
    mean_retention,
    mean_std,
    paired_claim,
    plan,
    retention,
    robustness,
    seeds_needed,
    sign_test_p,
    train_arguments,
)
from tests.conftest import ROOT, assert_ok
from tests.test_config import compose_config

# t_{0.975, df} from a printed table (df = 2, 5, 6).
T_975 = {2: 4.302652729911275, 5: 2.570581836614739, 6: 2.4469118511449692}


def test_the_interval_is_the_paired_t_interval():
    claim = paired_claim("higher", [0.10, 0.11, 0.12], direction=+1)
    half = T_975[2] * 0.01 / math.sqrt(3)
    assert claim["mean"] == pytest.approx(0.11) and claim["std"] == pytest.approx(0.01)
    assert claim["interval"] == pytest.approx((0.11 - half, 0.11 + half), abs=1e-12)
    assert claim["verdict"] == "holds" and claim["seeds_agreeing"] == 3


def test_a_claim_is_judged_by_where_its_interval_lies():
    # The README's NQH claim: every seed lower, but the interval spans 0 (it used to "hold").
    spans = paired_claim("lower", [-0.050, -0.105, -0.006], direction=-1)
    assert spans["interval"][0] < 0 < spans["interval"][1]
    assert spans["verdict"] == "inconclusive" and spans["seeds_agreeing"] == 3
    assert paired_claim("lower", [-0.10, -0.11, -0.12], direction=-1)["verdict"] == "holds"
    assert paired_claim("lower", [0.10, 0.11, 0.12], direction=-1)["verdict"] == "does not hold"
    # One seed has no interval.
    one = paired_claim("lower", [-0.10], direction=-1)
    assert one["interval"] is None and one["verdict"] == "inconclusive"
    # An undefined difference (a retention at clean top-1 0) decides nothing.
    undefined = paired_claim("higher", [0.1, math.nan, 0.2], direction=+1)
    assert undefined["verdict"] == "inconclusive" and undefined["interval"] is None
    assert undefined["sign_test_p"] is None and math.isnan(undefined["mean"])


def test_a_margin_moves_the_boundary_and_an_explicit_zero_margin_allows_no_difference():
    # A drop of at most 3 points: interval [-2.74, -0.26] points lies above -3.
    little = paired_claim("little", [-0.02, -0.01, -0.015], direction=+1, margin=0.03)
    assert little["interval"][0] > -0.03 and little["verdict"] == "holds"
    assert paired_claim("little", [-0.10, -0.11, -0.12], direction=+1, margin=0.03)["verdict"] == "does not hold"
    assert paired_claim("little", [-0.05, -0.01, 0.02], direction=+1, margin=0.03)["verdict"] == "inconclusive"
    # margin=0 means ">= 0", which equal variants meet; no margin means "> 0", which they do not
    # (margin=0 used to be read as no margin).
    equal = [0.0, 0.0, 0.0]
    assert paired_claim("no drop", equal, direction=+1, margin=0)["verdict"] == "holds"
    assert paired_claim("higher", equal, direction=+1)["verdict"] == "does not hold"


def test_the_sign_test_is_the_exact_binomial():
    assert sign_test_p([0.1, 0.2, 0.3]) == pytest.approx(2 * 0.5 ** 3)  # 0.25, its floor with 3 seeds
    assert sign_test_p([0.1, -0.2, 0.3]) == pytest.approx(1.0)  # 2 of 3: 2 * (3 + 1) / 8, capped at 1
    assert sign_test_p([0.1, 0.0, 0.3]) == pytest.approx(0.5)  # the zero dropped: 2 of 2
    assert sign_test_p([0.1] * 5) == pytest.approx(2 * 0.5 ** 5)
    assert sign_test_p([0.0, 0.0]) is None
    # Counted against the claim's boundary: with a 3-point margin, -2 points is on the claimed side.
    assert paired_claim("lower", [-0.1, -0.2, -0.3], direction=-1)["sign_test_p"] == pytest.approx(0.25)
    little = paired_claim("little", [-0.02, -0.04, 0.01], direction=+1, margin=0.03)
    assert little["sign_test_p"] == pytest.approx(1.0) and little["seeds_agreeing"] == 2
    assert math.isnan(mean_std([0.1, None])[0])


def test_seeds_needed_is_where_the_interval_half_width_drops_below_the_effect():
    # effect / sd = 1: half-width t sd / sqrt(n) is 1.049 sd at n = 6 and 0.925 sd at n = 7.
    assert T_975[5] / math.sqrt(6) > 1 > T_975[6] / math.sqrt(7)
    assert seeds_needed(1.0, 1.0) == 7
    assert seeds_needed(5.0, 1.0) == 3 and seeds_needed(0.5, 1.0) == 18
    # The README's NQH difference, -5.4 ± 4.9 points over 3 seeds.
    assert seeds_needed(5.4, 4.9) == 6
    # A margin adds to the effect: a 1-point drop under a 3-point margin is 2 points from it.
    assert seeds_needed(-1.0, 1.0, margin=3.0) == seeds_needed(2.0, 1.0) == 4
    # Holding in 80% of runs takes more seeds than holding at the observed size.
    assert seeds_needed(1.0, 1.0, power=0.8) > seeds_needed(1.0, 1.0)
    with pytest.raises(ValueError, match=r"effect \+ margin must be > 0 .* effect=-1.0"):
        seeds_needed(-1.0, 1.0)


def _result(acc, nqh, spg, ch, fgsm):
    return {"acc": acc, "nqh": nqh, "spg": spg, "ch": ch, "fgsm": {"eps=0": acc, "eps=2": fgsm, "eps=8": fgsm / 2}}


def test_retention_is_top1_under_attack_over_clean_top1():
    result = {"acc": 0.5, "fgsm": {"eps=0": 0.5, "eps=2": 0.25, "eps=8": 0.1}, "fgsm_success": {"eps=2": 0.6}}
    assert retention(result) == pytest.approx({"eps=2": 0.5, "eps=8": 0.2})
    assert mean_retention(result) == pytest.approx(0.35)
    # No share of a clean top-1 of 0 exists.
    assert math.isnan(mean_retention({"acc": 0.0, "fgsm": {"eps=0": 0.0, "eps=2": 0.0}}))
    # The success rate is passed on as the evaluation gave it; None where the report predates it.
    robust = robustness({"gmp": [result, {"acc": 0.4, "fgsm": {"eps=0": 0.4, "eps=2": 0.2, "eps=8": 0.2}}]})
    assert robust["gmp"]["mean_retention"] == pytest.approx([0.35, 0.5])
    assert robust["gmp"]["success"] == [{"eps=2": 0.6}, None]


def test_claims_compare_the_right_variants_seed_by_seed():
    results = {
        "baseline": [_result(0.70, 0.40, 0.30, 0.15, 0.20), _result(0.72, 0.42, 0.31, 0.16, 0.22)],
        "gc": [_result(0.69, 0.35, 0.31, 0.15, 0.20), _result(0.73, 0.44, 0.30, 0.16, 0.18)],
        "gmp": [_result(0.68, 0.41, 0.36, 0.20, 0.30), _result(0.70, 0.40, 0.35, 0.19, 0.32)],
        "gmp_gc": [_result(0.67, 0.33, 0.40, 0.21, 0.28), _result(0.69, 0.34, 0.34, 0.20, 0.30)],
    }
    found = claims(results, little_top1=0.03)
    assert len(found) == 8  # the objectives beside GC are not in this run: no claim on them
    by_name = {claim["claim"].split(" (")[0]: claim for claim in found}
    nqh = by_name["GC lowers NQH against the baseline"]
    assert nqh["differences"] == pytest.approx([-0.05, 0.02]) and nqh["verdict"] == "inconclusive"
    best = by_name["GMP+GC has the best SPG"]
    assert best["differences"] == pytest.approx([0.40 - 0.36, 0.34 - 0.35])
    assert by_name["GC costs little top-1"]["margin"] == 0.03

    # FGSM: retention (top-1 under attack / clean top-1), mean over the eps > 0 (eps=0 is clean).
    def kept(result):
        return (result["fgsm"]["eps=2"] + result["fgsm"]["eps=8"]) / 2 / result["acc"]

    fgsm = [claim for claim in found if "under FGSM" in claim["claim"]]
    assert len(fgsm) == 3 and all("retention: top-1 under attack / clean top-1" in c["claim"] for c in fgsm)
    for claim, (a, b) in zip(fgsm, (("gmp", "baseline"), ("gmp_gc", "baseline"), ("gmp_gc", "gc"))):
        assert claim["differences"] == pytest.approx([kept(x) - kept(y) for x, y in zip(results[a], results[b])])
    assert "Table 6 headline" in fgsm[1]["claim"] and "not in the paper" in fgsm[2]["claim"]

    # CGC and Energy guidance, when the run trains them, against the baseline of the same seed.
    results["cgc"] = [_result(0.69, 0.41, 0.30, 0.18, 0.15), _result(0.70, 0.43, 0.30, 0.19, 0.17)]
    results["energy"] = [{**_result(0.71, 0.50, 0.30, 0.20, 0.20), "pg": 0.9},
                         {**_result(0.70, 0.47, 0.31, 0.21, 0.21), "pg": 0.8}]
    for row, pg in zip(results["baseline"], (0.7, 0.75)):
        row["pg"] = pg
    by_name = {claim["claim"].split(" (")[0]: claim for claim in claims(results, little_top1=0.03)}
    assert len(by_name) == 13
    for name, metric, variant in (("CGC raises CH", "ch", "cgc"), ("CGC lowers NQH", "nqh", "cgc"),
                                  ("CGC costs little top-1", "acc", "cgc"),
                                  ("Energy guidance raises PG", "pg", "energy"),
                                  ("Energy guidance raises CH", "ch", "energy")):
        claim = by_name[f"{name} against the baseline" if "costs" not in name else name]
        expected = [x[metric] - y[metric] for x, y in zip(results[variant], results["baseline"])]
        assert claim["differences"] == pytest.approx(expected), name
    assert by_name["CGC lowers NQH against the baseline"]["direction"] == -1


def test_gc_overrides_reach_only_the_gc_variants(tmp_path):
    shared = 'gc_overrides=["loss.composites=shared"]'
    cfg = compose_config("reproduce", f"output_dir={tmp_path}", shared, 'train_overrides=["trainer=cpu"]')
    by_variant = {run.variant: train_arguments(cfg, run) for run in plan(cfg) if run.seed == 0}
    for variant, arguments in by_variant.items():
        assert "trainer=cpu" in arguments
        assert ("loss.composites=shared" in arguments) == (variant in ("gc", "gmp_gc")), variant
    # The same overrides given to every variant fail in train.py for the CE ones: loss.composites
    # does not exist there. Given with no GC variant at all, they are refused before anything runs.
    no_gc = ['variants.gc=["loss=ce"]', 'variants.gmp_gc=["loss=ce","model.pooling=max"]']
    with pytest.raises(ConfigError) as err:
        plan(compose_config("reproduce", f"output_dir={tmp_path}", shared, *no_gc))
    assert err.value.keys == ["gc_overrides"]


@pytest.mark.slow
def test_reproduce_command_end_to_end_reuses_finished_steps(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    command = [sys.executable, str(ROOT / "reproduce.py"), f"output_dir={out}", f"data_dir={data}", "seeds=[0,1]",
               "epochs=1", "train_per_class=3", "image_size=48", "batch_size=8", "heatmap_images=2",
               'data_overrides=["data.object_scale=[0.3,0.5]","data.num_classes=4","data.val_per_class=3",'
               '"data.num_workers=0"]', "evaluation.fgsm_eps=[0,8]", "evaluation.spg_runs=2", "faithfulness_images=4",
               "evaluation.perturbation_steps=4"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert_ok(first)
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"baseline", "gc", "gmp", "gmp_gc", "cgc", "energy"}
    assert all(len(rows) == 2 for rows in report["results"].values())
    assert len(report["claims"]) == 15 and all(len(c["differences"]) == 2 for c in report["claims"])
    assert "GC's maps are at least as faithful as the baseline's: deletion AUC not higher" in [
        claim["claim"] for claim in report["claims"]]
    assert {"insertion", "insertion_minus_others", "deletion", "mprt"} <= set(report["results"]["gc"][0])
    assert {claim["verdict"] for claim in report["claims"]} <= {"holds", "does not hold", "inconclusive"}
    assert len(report["consensus"]["members"]) == 12
    markdown = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 6", "claims, paired over seeds", "Committee consensus", "## Faithfulness (4 ",
                    "| Insertion - others |",
                    "reference: centred peak", "reference: uniform noise", "pixel space"):
        assert heading in markdown
    for figure in ("heatmaps.png", "fgsm.png", "consensus/scatter.png"):
        assert (out / figure).stat().st_size > 0
    # Each training run used its variant's loss and pooling, and its seed.
    config = (out / "runs" / "gmp_gc" / "seed1" / ".hydra" / "overrides.yaml").read_text()
    assert "loss=gc" in config and "model.pooling=max" in config and "seed=1" in config
    assert "loss=energy" in (out / "runs" / "energy" / "seed1" / ".hydra" / "overrides.yaml").read_text()
    assert "lambda GC 25, CGC 0.5, Energy 1;" in markdown and "| CGC |" in markdown

    # As if the run had crashed while training GC seed 1: only that run (and its evaluation) is redone.
    (out / "runs" / "gc" / "seed1" / "reproduce_step.json").unlink()
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert_ok(again)
    assert again.stdout.count("reusing training") == 11 and again.stdout.count("reusing evaluation") == 11
    assert again.stdout.count("reusing faithfulness") == 11
    assert "running training [8/12] gc seed 1" in again.stdout
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]  # CPU runs are exact

    changed = subprocess.run([*command, "epochs=2"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert changed.returncode != 0 and "holds a finished run with other settings" in changed.stderr
