"""The one-command reproduction: claim verdicts by hand, and the whole command on tiny data, rerun
to show that finished steps are reused and that other settings never mix with them."""
import json
import math
import subprocess
import sys

import pytest

from evaluation.reproduce import claims, mean_std, paired_claim, plan, train_arguments
from tests.conftest import ROOT, assert_ok
from tests.test_config import compose_config


def test_paired_claims_judge_the_mean_and_every_seed():
    holds = paired_claim("lower", [-0.02, -0.01, -0.03], direction=-1)
    assert holds["verdict"] == "holds" and holds["seeds_agreeing"] == 3
    assert holds["mean"] == pytest.approx(-0.02) and holds["std"] == pytest.approx(0.01)
    assert paired_claim("lower", [-0.05, 0.01, -0.02], direction=-1)["verdict"] == "mixed"
    assert paired_claim("lower", [0.05, 0.01, -0.02], direction=-1)["verdict"] == "does not hold"
    # A margin: a drop of at most 3 points counts as "little".
    little = paired_claim("little", [-0.02, -0.01, 0.01], direction=+1, margin=0.03)
    assert little["verdict"] == "holds"
    assert paired_claim("little", [-0.05, -0.04, -0.01], direction=+1, margin=0.03)["verdict"] == "does not hold"
    assert math.isnan(mean_std([0.1, None])[0])


def _result(acc, nqh, spg, ch, fgsm):
    return {"acc": acc, "nqh": nqh, "spg": spg, "ch": ch, "fgsm": {"eps=0": acc, "eps=2": fgsm, "eps=8": fgsm / 2}}


def test_claims_compare_the_right_variants_seed_by_seed():
    results = {
        "baseline": [_result(0.70, 0.40, 0.30, 0.15, 0.20), _result(0.72, 0.42, 0.31, 0.16, 0.22)],
        "gc": [_result(0.69, 0.35, 0.31, 0.15, 0.20), _result(0.73, 0.44, 0.30, 0.16, 0.18)],
        "gmp": [_result(0.68, 0.41, 0.36, 0.20, 0.30), _result(0.70, 0.40, 0.35, 0.19, 0.32)],
        "gmp_gc": [_result(0.67, 0.33, 0.40, 0.21, 0.28), _result(0.69, 0.34, 0.34, 0.20, 0.30)],
    }
    found = {claim["claim"].split(" (")[0]: claim for claim in claims(results, little_top1=0.03)}
    nqh = found["GC lowers NQH against the baseline"]
    assert nqh["differences"] == pytest.approx([-0.05, 0.02]) and nqh["verdict"] == "mixed"
    assert found["GMP raises SPG against the baseline"]["verdict"] == "holds"
    best = found["GMP+GC has the best SPG"]
    assert best["differences"] == pytest.approx([0.40 - 0.36, 0.34 - 0.35]) and best["verdict"] == "mixed"
    # FGSM: mean over the eps > 0 only (eps=0 is the clean accuracy).
    robust = found["GMP keeps more top-1 under FGSM"]
    assert robust["differences"] == pytest.approx([(0.30 + 0.15) / 2 - (0.20 + 0.10) / 2,
                                                   (0.32 + 0.16) / 2 - (0.22 + 0.11) / 2])
    assert found["GC costs little top-1"]["verdict"] == "holds"


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
    with pytest.raises(ValueError, match="no variant trains with loss=gc"):
        plan(compose_config("reproduce", f"output_dir={tmp_path}", shared, *no_gc))


@pytest.mark.slow
def test_reproduce_command_end_to_end_reuses_finished_steps(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    command = [sys.executable, "-m", "evaluation.reproduce", f"output_dir={out}", f"data_dir={data}", "seeds=[0,1]",
               "epochs=1", "train_per_class=3", "image_size=48", "batch_size=8", "heatmap_images=2",
               'data_overrides=["data.object_scale=[0.3,0.5]","data.num_classes=4","data.val_per_class=3",'
               '"data.num_workers=0"]', "evaluation.fgsm_eps=[0,8]", "evaluation.spg_runs=2"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert_ok(first)
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"baseline", "gc", "gmp", "gmp_gc"}
    assert all(len(rows) == 2 for rows in report["results"].values())
    assert len(report["claims"]) == 7 and all(len(c["differences"]) == 2 for c in report["claims"])
    assert len(report["consensus"]["members"]) == 8
    markdown = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 6", "claims, paired over seeds", "Committee consensus",
                    "reference: centred peak", "reference: uniform noise", "pixel space"):
        assert heading in markdown
    for figure in ("heatmaps.png", "fgsm.png", "consensus/scatter.png"):
        assert (out / figure).stat().st_size > 0
    # Each training run used its variant's loss and pooling, and its seed.
    config = (out / "runs" / "gmp_gc" / "seed1" / ".hydra" / "overrides.yaml").read_text()
    assert "loss=gc" in config and "model.pooling=max" in config and "seed=1" in config

    # As if the run had crashed while training GC seed 1: only that run (and its evaluation) is redone.
    (out / "runs" / "gc" / "seed1" / "reproduce_step.json").unlink()
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert_ok(again)
    assert again.stdout.count("reusing training") == 7 and again.stdout.count("reusing evaluation") == 7
    assert "running training [6/8] gc seed 1" in again.stdout
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]  # CPU runs are exact

    changed = subprocess.run([*command, "epochs=2"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert changed.returncode != 0 and "holds a finished run with other settings" in changed.stderr
