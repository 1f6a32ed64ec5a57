"""End-to-end runs of ``python train.py`` (the real command line) on tiny synthetic data."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=64", "data.num_classes=3", "data.train_per_class=4", "data.val_per_class=2",
    "data.batch_size=6", "data.num_workers=0", "trainer.max_epochs=1", "heatmap_images=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def train(out: Path, data_dir: Path | None, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    """Run train.py; with ``data_dir`` on the tiny synthetic data, without it on ``overrides`` alone."""
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    data = [f"data.data_dir={data_dir}", *TINY] if data_dir is not None else []
    command = [sys.executable, "train.py", *(["-m"] if multirun else []), f"{dir_key}={out}", *data, *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def assert_ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def read_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["last_checkpoint"]).is_file() and Path(summary["best_checkpoint"]).is_file()
    assert (out / "heatmaps.png").stat().st_size > 0
    return summary


def logged_metrics(out: Path) -> list[dict]:
    with open(next(out.glob("csv/version_*/metrics.csv"))) as handle:
        return list(csv.DictReader(handle))


def test_default_gc_run_logs_both_terms_and_leaves_checkpoints(tmp_path, data_dir):
    run = train(tmp_path, data_dir)
    assert_ok(run)
    summary = read_summary(tmp_path)
    assert summary["loss"] == "gc" and summary["model"] == "resnet18"
    assert "val/acc" in run.stdout and summary["last_checkpoint"] in run.stdout
    rows = logged_metrics(tmp_path)
    columns = set().union(*rows)
    assert {"train/ce_epoch", "train/gc_epoch", "train/loss_epoch", "train/acc", "val/acc", "train/gc_left_out"} <= columns
    checkpoint = torch.load(summary["last_checkpoint"], weights_only=False)
    assert checkpoint["hyper_parameters"]["model"] == {"name": "resnet18", "pooling": "avg", "pretrained": False}


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=alexnet", "loss=ce"],
        ["model=alexnet", "loss=gc"],
        ["model=resnet50", "model.pooling=max", "logger=tensorboard"],
        ["loss=gc", "loss.lambda=25", "data.context_bias=0.8", "seed=3", "logger=wandb"],
    ],
)
def test_models_losses_and_loggers(tmp_path, data_dir, overrides):
    run = train(tmp_path, data_dir, *overrides)
    assert_ok(run)
    summary = read_summary(tmp_path)
    expected = dict(item.split("=", 1) for item in overrides if not item.startswith(("logger", "data", "seed")))
    assert summary["model"] == expected.get("model", "resnet18")
    if "logger=tensorboard" in overrides:
        assert list(tmp_path.glob("tensorboard/version_*/events.out.tfevents.*"))
    if "logger=wandb" in overrides:
        assert list(tmp_path.glob("wandb/offline-run-*"))


def test_ddp_on_two_cpu_processes(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "trainer=ddp_cpu")
    assert_ok(run)
    summary = read_summary(tmp_path)
    assert summary["loss"] == "gc"
    # The explanation callback's metrics are reduced over both processes without a deadlock.
    assert {"explain/pg", "explain/nqh", "explain/fgsm/eps=8"} <= set().union(*logged_metrics(tmp_path))


def test_multirun_one_output_dir_per_run(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "loss=ce,gc", "model.pooling=avg,max", "heatmap_images=0", multirun=True)
    assert_ok(run)
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(runs) == 4
    combos = {(s["loss"], s["pooling"]) for s in (json.loads((p / "summary.json").read_text()) for p in runs)}
    assert combos == {("ce", "avg"), ("ce", "max"), ("gc", "avg"), ("gc", "max")}


def test_resume_same_architecture_and_refuse_another(tmp_path, data_dir):
    first = tmp_path / "first"
    assert_ok(train(first, data_dir))
    last = read_summary(first)["last_checkpoint"]
    resumed = train(tmp_path / "resumed", data_dir, f"ckpt_path={last}", "trainer.max_epochs=2")
    assert_ok(resumed)
    assert read_summary(tmp_path / "resumed")["epochs"] == 2
    other = train(tmp_path / "other", data_dir, f"ckpt_path={last}", "model=alexnet")
    assert other.returncode != 0
    assert "cannot resume" in other.stderr and "model.name: checkpoint has 'resnet18', config has 'alexnet'" in other.stderr
    classes = train(tmp_path / "classes", data_dir, f"ckpt_path={last}", "data.num_classes=4")
    assert classes.returncode != 0
    assert "number of classes: checkpoint has 3, data has 4" in classes.stderr
