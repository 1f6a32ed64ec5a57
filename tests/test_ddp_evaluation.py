"""Evaluation under DDP equals one process: every metric of 2 gloo processes on an odd number of
images equals that of one process, whatever the batch size (no image padded in twice, none
dropped, and SPG's points and the noise maps drawn per trial); and so does the evaluation
script's report on 2 processes (Fabric's launcher and torchrun)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.sampling import shard_indices, spread_indices
from tests.conftest import PYTHON, TORCHRUN_2, assert_ok, read_summary, run_module, train
from tests.ddp_evaluation import DATA, MAX_IMAGES, WORLD_SIZE, datamodule, evaluate

ROOT = Path(__file__).resolve().parents[1]
# Every key of the results: the metrics, their references and the skipped counts.
FAITHFULNESS = {f"{name}{suffix}" for name in ("insertion", "deletion", "road_morf", "road_lerf")
                for suffix in ("", "_others", "_minus_others", "_curve")}
KEYS = {"acc", "pg", "pg_micro", "spg", "spg_std", "ch", "nqh", "fgsm", "fgsm_success", "fgsm_clean", "skipped",
        "mprt", "mprt_unchanged", "mprt_spearman", "mprt_spearman_abs", "mprt_ssim"} | FAITHFULNESS | {
    f"{key}_{reference}" for key in ("pg", "pg_micro", "spg", "spg_std", "ch", *FAITHFULNESS)
    for reference in ("center", "noise")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datamodule(root)  # generated once, before processes read it
    return root


def assert_same_results(actual: dict, expected: dict) -> None:
    """Equal up to float64 summation order: the processes add their sums in another order."""
    assert actual.keys() == expected.keys() == KEYS
    assert actual["skipped"] == expected["skipped"] and actual["fgsm"] == expected["fgsm"]
    assert actual["fgsm_success"] == expected["fgsm_success"]
    for key in KEYS - {"skipped", "fgsm", "fgsm_success"}:
        assert actual[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15, nan_ok=False), key


def test_shards_cover_every_image_once():
    for length, count in ((9, 7), (7, None), (1, None)):
        expected = spread_indices(length, length if count is None else count)
        shards = [shard_indices(length, rank, WORLD_SIZE, count) for rank in range(WORLD_SIZE)]
        assert sorted(shards[0] + shards[1]) == expected and not set(shards[0]) & set(shards[1])


def test_results_do_not_depend_on_the_batch_size(data_dir):
    reference = evaluate(data_dir, batch_size=7)
    # Every map was scored (a randomised network's constant map has no rank correlation: skipped).
    assert not any(count for name, count in reference["skipped"].items() if name != "mprt")
    assert reference["spg_std"] > 0 and reference["insertion_minus_others"] != 0
    assert len(set(reference["fgsm"].values())) > 1  # the attack changed predictions
    for batch_size in (1, 3):
        assert_same_results(evaluate(data_dir, batch_size=batch_size), reference)


@pytest.mark.slow  # 2 processes
def test_two_gloo_processes_equal_one_process_on_an_odd_number_of_images(data_dir, tmp_path):
    assert MAX_IMAGES % WORLD_SIZE and len(datamodule(data_dir).val_dataset()) > MAX_IMAGES
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "tests.ddp_evaluation", str(data_dir), str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert ranks[0] == ranks[1]  # both processes hold the summed states
    assert_same_results(ranks[0], evaluate(data_dir, batch_size=DATA["batch_size"]))


def evaluation_report(out: Path, launcher: tuple[str, ...], data_dir: Path, checkpoint: str, *overrides: str) -> dict:
    """``python -m evaluation`` of ``checkpoint`` on the tiny synthetic data, launched by
    ``launcher``; each image alone in its batch, so that every process computes every map exactly
    as one process does. Returns report.json, after checking that one process wrote it."""
    run = run_module("evaluation", out, data_dir, f"ckpt_path={checkpoint}", "metrics=[acc,pg,spg,ch,nqh,fgsm]",
                     "evaluation.batch_size=1", "heatmap_images=1", "heatmap_composites=0", "device=cpu", *overrides,
                     launcher=launcher)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("# Explanation evaluation") == 1  # rank 0 alone prints and writes the report
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow  # a training run and 2 processes, twice
def test_the_evaluation_script_on_two_processes_reports_one_processs_numbers(tmp_path):
    """``devices=2`` (Fabric's launcher) and ``torchrun --nproc-per-node=2`` give the report of one
    process: the same trials and counts, the same scores up to the order of float64 sums."""
    data_dir = tmp_path / "data"
    assert_ok(train(tmp_path / "run", data_dir, "loss=gc"))
    checkpoint = read_summary(tmp_path / "run")["last_checkpoint"]
    one = evaluation_report(tmp_path / "one", PYTHON, data_dir, checkpoint)
    launchers = {"devices": (PYTHON, "devices=2"), "torchrun": (TORCHRUN_2, "seed=0")}
    for name, (launcher, option) in launchers.items():
        report = evaluation_report(tmp_path / name, launcher, data_dir, checkpoint, option)
        assert report["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
        results, expected = report["checkpoints"][0]["results"], one["checkpoints"][0]["results"]
        assert results.keys() == expected.keys() and results["skipped"] == expected["skipped"], name
        for key, value in expected.items():
            if isinstance(value, float):
                assert results[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
            else:
                assert results[key] == value, (name, key)
