"""End-to-end runs of ``python train.py`` (the real command line) on tiny synthetic data."""
import json

import pytest
import torch

from tests.conftest import assert_ok, logged_metrics, read_summary, train

pytestmark = pytest.mark.slow


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
    assert checkpoint["hyper_parameters"]["model"] == {"name": "resnet18", "pooling": "avg", "pretrained": False, "output_stride": 16}


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
