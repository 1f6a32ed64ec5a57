"""End-to-end runs of ``python train.py`` (the real command line) on tiny synthetic data."""
import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multilabel_f1_score

from gcmodels.checkpoints import load_checkpoint
from gcmodels.module import GCClassifier
from tests.conftest import assert_ok, linear_net, logged_metrics, read_summary, run_module, train

pytestmark = pytest.mark.slow


def test_default_gc_run_logs_both_terms_and_leaves_checkpoints(tmp_path, data_dir):
    run = train(tmp_path, data_dir)
    assert_ok(run)
    summary = read_summary(tmp_path)
    assert summary["loss"] == "gc" and summary["model"] == "resnet18"
    assert "val/acc" in run.stdout and summary["last_checkpoint"] in run.stdout
    assert "6 (6 per process x 1)" in run.stdout and summary["processes"] == 1
    rows = logged_metrics(tmp_path)
    columns = set().union(*rows)
    assert {"train/ce_epoch", "train/gc_epoch", "train/loss_epoch", "train/acc", "val/acc",
            "train/gc_left_out"} <= columns
    checkpoint = torch.load(summary["last_checkpoint"], weights_only=False)
    assert checkpoint["hyper_parameters"]["model"] == {"name": "resnet18", "pooling": "avg", "pretrained": False,
                                                       "output_stride": 16, "init_from": None}


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
    # data.batch_size is global: 6 images per process, as a single process has in the other tests.
    run = train(tmp_path / "ddp", data_dir, "trainer=ddp_cpu", "data.batch_size=12")
    assert_ok(run)
    summary = read_summary(tmp_path / "ddp")
    assert summary["loss"] == "gc" and summary["processes"] == 2 and "12 (6 per process x 2)" in run.stdout
    # The explanation callback's metrics are reduced over both processes without a deadlock.
    assert {"explain/pg", "explain/nqh", "explain/fgsm/eps=8"} <= set().union(*logged_metrics(tmp_path / "ddp"))
    odd = train(tmp_path / "odd", data_dir, "trainer=ddp_cpu", "data.batch_size=7")
    assert odd.returncode != 0
    assert "ConfigError: data.batch_size: 7 is the global batch, split evenly over the 2 processes" in odd.stderr


def test_multirun_one_output_dir_per_run(tmp_path, data_dir):
    run = train(tmp_path, data_dir, "loss=ce,gc", "model.pooling=avg,max", "heatmap_images=0", multirun=True)
    assert_ok(run)
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(runs) == 4
    combos = {(s["loss"], s["pooling"]) for s in (json.loads((p / "summary.json").read_text()) for p in runs)}
    assert combos == {("ce", "avg"), ("ce", "max"), ("gc", "avg"), ("gc", "max")}


@pytest.fixture(scope="module")
def last_checkpoint(tmp_path_factory, data_dir) -> str:
    """last.ckpt of a default run on the tiny data (ResNet18, 3 classes)."""
    first = tmp_path_factory.mktemp("first")
    assert_ok(train(first, data_dir))
    return read_summary(first)["last_checkpoint"]


def test_resume_same_architecture_and_refuse_another(tmp_path, data_dir, last_checkpoint):
    last = last_checkpoint
    resumed = train(tmp_path / "resumed", data_dir, f"ckpt_path={last}", "trainer.max_epochs=2")
    assert_ok(resumed)
    assert read_summary(tmp_path / "resumed")["epochs"] == 2
    other = train(tmp_path / "other", data_dir, f"ckpt_path={last}", "model=alexnet")
    assert other.returncode != 0
    assert ("cannot resume" in other.stderr
            and "model.name: checkpoint has 'resnet18', config has 'alexnet'" in other.stderr)
    classes = train(tmp_path / "classes", data_dir, f"ckpt_path={last}", "data.num_classes=4")
    assert classes.returncode != 0
    assert "number of classes: checkpoint has 3, data has 4" in classes.stderr


def test_init_from_another_runs_weights_and_not_beside_a_resume(tmp_path, data_dir, last_checkpoint):
    last = last_checkpoint
    # Another class set, as ImageNet -> COCO: the final layer starts fresh, and the log says so.
    started = train(tmp_path / "started", data_dir, f"model.init_from={last}", "data.num_classes=4")
    assert_ok(started)
    log = started.stdout + started.stderr
    assert f"model.init_from: network weights loaded from {Path(last).resolve()}" in log
    assert "not loaded: head.2.bias, head.2.weight (the final layer keeps its fresh initialisation: the " \
           "checkpoint has 3 classes, this run 4)" in log
    summary = read_summary(tmp_path / "started")
    checkpoint = torch.load(summary["last_checkpoint"], weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["init_from"] == summary["init_from"] == str(Path(last).resolve())
    both = train(tmp_path / "both", data_dir, f"ckpt_path={last}", f"model.init_from={last}")
    assert both.returncode != 0
    assert (f"model.init_from: the checkpoint's run started from None, config has '{Path(last).resolve()}'"
            in both.stderr)
    other = train(tmp_path / "other", data_dir, f"model.init_from={last}", "model=alexnet")
    assert (other.returncode != 0
            and "holds a 'resnet18' network, but this run builds model.name='alexnet'" in other.stderr)


def test_multilabel_validation_logs_overall_and_per_class_f1():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 2, 2, generator=generator, dtype=torch.float64)
    # Class 0 on most images, class 3 on one: the two averages differ.
    targets = torch.zeros(12, 4, dtype=torch.float64)
    targets[:10, 0] = targets[::3, 1] = targets[1::4, 2] = targets[5, 3] = 1
    samples = [{"image": image, "target": target} for image, target in zip(images, targets)]
    module = GCClassifier(model={"name": "linear", "pooling": "avg", "pretrained": False, "output_stride": None,
                                 "init_from": None},
                          loss={"name": "ce"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={"name": "none"},
                          num_classes=4, multilabel=True, layout_seed=0, net=linear_net(12, 4))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, DataLoader(samples, batch_size=5), verbose=False)[0]
    logits = module.net(images)
    overall = multilabel_f1_score(logits, targets.long(), num_labels=4, average="micro")
    per_class = multilabel_f1_score(logits, targets.long(), num_labels=4, average="macro")
    assert overall != pytest.approx(per_class)
    assert (logged["val/f1"] == pytest.approx(float(overall))
            and logged["val/f1_per_class"] == pytest.approx(float(per_class)))


def test_a_truncated_checkpoint_is_refused_before_training(tmp_path, data_dir, last_checkpoint):
    cut = tmp_path / "cut.ckpt"
    with open(last_checkpoint, "rb") as whole:
        cut.write_bytes(whole.read(Path(last_checkpoint).stat().st_size // 2))
    run = train(tmp_path / "run", data_dir, f"ckpt_path={cut}")
    assert run.returncode != 0 and f"not a readable PyTorch checkpoint: {cut}" in run.stderr


def test_an_unwritable_output_folder_is_an_error_before_anything_runs(tmp_path):
    # Folders under a regular file: unwritable for root too, which a chmod is not.
    blocker = tmp_path / "file"
    blocker.write_text("")
    fresh_data = tmp_path / "data"
    run = train(tmp_path / "run", fresh_data, f"output_dir={blocker}/out")
    assert run.returncode != 0
    assert f"output_dir={blocker}/out cannot be written (NotADirectoryError: Not a directory)" in run.stderr
    assert not fresh_data.exists()  # nothing generated, nothing trained
    hydra_dir = train(blocker / "run", fresh_data)  # Hydra creates its run folder itself, first
    assert hydra_dir.returncode != 0 and f"Not a directory: '{blocker / 'run'}'" in hydra_dir.stderr


def test_a_non_finite_loss_stops_the_run_with_a_checkpoint_or_is_skipped(tmp_path, data_dir):
    huge = ["optimizer=sgd", "optimizer.lr=1e30", "trainer.max_epochs=2", "heatmap_images=0",
            "~callbacks.explanation_metrics", "~callbacks.fgsm_robustness"]
    stopped = train(tmp_path / "stop", data_dir, *huge)
    error = re.search(r"FloatingPointError: non-finite (.+) at global step (\d+) \(epoch \d+\), learning rate 1e\+30\. "
                      r"Training stopped; .* is saved in (\S+\.ckpt);", stopped.stderr)
    assert stopped.returncode != 0 and error, stopped.stderr[-3000:]
    assert re.match(r"train/ce = |train/gc = |the gradient of net\.", error.group(1))
    saved = load_checkpoint(error.group(3))
    assert saved["global_step"] == int(error.group(2)) >= 1
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())
    skipped = train(tmp_path / "skip", data_dir, *huge, "callbacks.nonfinite.mode=skip")
    assert_ok(skipped)
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["status"] == "finished" and 1 <= summary["nonfinite_skipped"] <= summary["global_step"] == 4
    assert max(float(row["train/nonfinite_skipped"]) for row in logged_metrics(tmp_path / "skip")
               if row.get("train/nonfinite_skipped")) == summary["nonfinite_skipped"]


@pytest.mark.parametrize("model", ["vgg16", "convnext_tiny", "vit"])
def test_new_networks_train_with_gc_and_are_scored_beside_the_reference_maps(tmp_path, data_dir, model):
    """``python train.py model=... loss=gc`` on the synthetic data (64 px: a multiple of every
    stride), then ``python -m evaluation`` of its checkpoint with the reference rows."""
    run = train(tmp_path / "run", data_dir, f"model={model}", "loss=gc")
    assert_ok(run)
    summary = read_summary(tmp_path / "run")
    assert summary["model"] == model
    rows = logged_metrics(tmp_path / "run")
    assert any(row.get("train/gc_epoch") for row in rows)  # the GC term was computed
    out = tmp_path / "eval"
    assert_ok(run_module("evaluation", out, data_dir, f"ckpt_path={summary['last_checkpoint']}",
                         "metrics=[acc,pg,ch,nqh]", "heatmap_images=2"))
    report = (out / "report.md").read_text()
    assert "reference: centred peak" in report and "reference: uniform noise" in report
    results = json.loads((out / "report.json").read_text())["checkpoints"][0]["results"]
    assert 0 <= results["pg"] <= 1 and 0 <= results["nqh"] <= 1
