"""Trustworthy runs: resuming at an epoch end continues exactly as the run would have gone on; a run
killed mid-epoch resumes from its step checkpoint; Ctrl-C leaves a checkpoint and the summary; a
non-finite step stops the run with a checkpoint of the state before it (or is skipped); checkpoint
files are never left half-written. docs/reliability.md lists each fault with its test."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from gcmodels.callbacks import AtomicCheckpointIO, NonFiniteGuard
from gcmodels.checkpoints import load_checkpoint
from gcmodels.module import GCClassifier
from gcmodels.networks import ExplainableNet
from tests.conftest import ROOT, TINY, assert_ok, train
from tests.test_config import compose_config

QUICK = ["~callbacks.explanation_metrics", "~callbacks.fgsm_robustness", "heatmap_images=0"]
# The FGSM callback stays on at one eps: like every evaluation callback it draws from torch's global
# stream (each loader it iterates takes a seed); the probe draws from every global stream.
EXACT = ["~callbacks.explanation_metrics", "evaluation.fgsm_eps=[8]", "heatmap_images=0", "trainer.max_epochs=2",
         "+callbacks.probe._target_=tests.resume_helpers.RandomStateProbe"]


def same(one, other) -> bool:
    """Nested checkpoint content equal, tensors bit for bit."""
    if isinstance(one, torch.Tensor):
        return isinstance(other, torch.Tensor) and one.dtype == other.dtype and torch.equal(one, other)
    if isinstance(one, dict):
        return isinstance(other, dict) and one.keys() == other.keys() and all(same(one[k], other[k]) for k in one)
    if isinstance(one, (list, tuple)):
        return isinstance(other, (list, tuple)) and len(one) == len(other) and all(map(same, one, other))
    return one == other


@pytest.mark.slow
@pytest.mark.parametrize("workers, loss", [(0, "gc"), (1, "gc"), (1, "cgc"), (1, "energy")])
def test_resuming_at_an_epoch_end_is_bitwise_exact(tmp_path, data_dir, workers, loss):
    """Each objective's own draws (GC's layouts; CGC's crops and flips and a guided class's mask through the
    augmentation, in the loader workers) too."""
    def run(name: str, *overrides: str) -> dict:
        assert_ok(train(tmp_path / name, data_dir, *EXACT, f"+callbacks.probe.path={tmp_path / name}.jsonl",
                        f"data.num_workers={workers}", f"loss={loss}", *overrides))
        return load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")

    straight = run("straight")
    # Stopped after its first epoch (12 images, 2 steps), as a run killed then would be.
    run("first", "+trainer.max_steps=2")
    resumed = run("resumed", f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    # last.ckpt is the final epoch's even when it did not improve val/acc (Lightning 2.6 alone
    # would leave the best epoch's there).
    assert straight["global_step"] == resumed["global_step"] == 4
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "random_states"):
        assert same(straight[key], resumed[key]), key
    # Every stream at the second epoch's first step, after what the callbacks drew at the end of
    # the first: the same in both runs.
    records = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
               for name in ("straight", "resumed")}
    assert [record["epoch"] for record in records["straight"]] == [0, 1]
    assert records["resumed"] == records["straight"][1:]


def start(out: Path, data_dir: Path, *overrides: str) -> subprocess.Popen:
    """``python train.py`` on the tiny data, running in the background; output in ``out.log``."""
    out.mkdir(parents=True)
    command = [sys.executable, "train.py", f"hydra.run.dir={out}", f"data.data_dir={data_dir}", *TINY, *overrides]
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"train.py ended early with status {process.returncode}"
        assert time.monotonic() < deadline, "train.py did not get there in time"
        time.sleep(0.05)


def slow_steps(out: Path, seconds: float) -> list[str]:
    return ["+callbacks.slow._target_=tests.resume_helpers.SlowSteps", f"+callbacks.slow.seconds={seconds}",
            f"+callbacks.slow.marker={out}/steps"]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_its_step_checkpoint(tmp_path, data_dir):
    # 24 images: 4 steps, a checkpoint after each but the last (the epoch end writes that one).
    steps = ["data.train_per_class=8", "callbacks.model_checkpoint.every_n_train_steps=1", *QUICK]
    out = tmp_path / "killed"
    process = start(out, data_dir, *steps, *slow_steps(out, 2))
    last = out / "checkpoints" / "last.ckpt"
    wait_for(last.is_file, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(last)["global_step"]
    assert 1 <= killed_at < 4
    resumed = train(tmp_path / "resumed", data_dir, *steps, f"ckpt_path={last}")
    assert_ok(resumed)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 1
    # Lightning runs only the epoch's remaining number of batches (drawn afresh: not exact).
    assert summary["global_step"] == 4
    assert "resuming from a checkpoint that ended before the epoch ended" in resumed.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_summary(tmp_path, data_dir):
    out = tmp_path / "run"
    process = start(out, data_dir, *QUICK, *slow_steps(out, 1))
    wait_for((out / "steps").is_file, process)  # the first step has finished
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 1
    log = Path(f"{out}.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted", log[-3000:]
    saved = load_checkpoint(summary["last_checkpoint"])
    assert saved["global_step"] == summary["global_step"] >= 1
    assert f"Ctrl-C: checkpoint after global step {saved['global_step']} saved in {summary['last_checkpoint']}" in log


def tiny_bn_module(lr: float) -> GCClassifier:
    """A GC module on conv -> batch norm -> ReLU: at a huge learning rate, the second step's batch
    statistics overflow and its loss terms and gradients are NaN."""
    torch.manual_seed(0)
    net = ExplainableNet(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)))
    return GCClassifier(
        model={"name": "tiny", "pooling": "avg", "pretrained": False, "output_stride": None, "init_from": None},
        loss={"name": "gc", "lambda": 1.0, "cam_mode": "elementwise", "detach_target": False, "positive": "labels",
              "composite_source": "batch", "composites": "per_sample"},
        optimizer={"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4}, scheduler={"name": "none"},
        num_classes=3, multilabel=False, layout_seed=0, net=net)


def test_resuming_with_more_epochs_warns_that_the_cosine_schedule_keeps_its_length(tmp_path):
    samples = [{"image": torch.rand(3, 8, 8), "target": index % 3} for index in range(6)]
    module = tiny_bn_module(0.1)
    module.hparams.scheduler = {"name": "cosine", "eta_min": 0.0}

    def fit(epochs: int, ckpt_path=None) -> pl.Trainer:
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, DataLoader(samples, batch_size=3), ckpt_path=ckpt_path)
        return trainer

    fit(2).save_checkpoint(tmp_path / "two.ckpt")
    with pytest.warns(UserWarning, match=r"trainer\.max_epochs=4, but the checkpoint's cosine schedule spans T_max=2"):
        resumed = fit(4, tmp_path / "two.ckpt")
    assert resumed.lr_scheduler_configs[0].scheduler.T_max == 2  # what the warning says: the old length stays


class RecordStates(pl.Callback):
    """The module's state (weights and batch-norm statistics) before every step."""

    def __init__(self):
        self.before: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({key: value.clone() for key, value in pl_module.state_dict().items()})


def fit_tiny(guard: NonFiniteGuard, record: RecordStates, lr: float = 1e30) -> GCClassifier:
    """Two epochs of three steps."""
    generator = torch.Generator().manual_seed(0)
    samples = [{"image": torch.rand(3, 8, 8, generator=generator), "target": index % 3} for index in range(12)]
    module = tiny_bn_module(lr)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, record])
    trainer.fit(module, DataLoader(samples, batch_size=4))
    return module


def test_a_non_finite_step_stops_the_run_after_saving_the_state_before_it(tmp_path):
    record = RecordStates()
    with pytest.raises(FloatingPointError) as raised:
        fit_tiny(NonFiniteGuard("stop", str(tmp_path)), record)
    path = tmp_path / "nonfinite-step000001.ckpt"
    assert str(raised.value).startswith(
        "non-finite train/ce = nan, train/gc = nan, the gradient of net.features.0.weight (and 5 more parameters) at "
        f"global step 1 (epoch 0), learning rate 1e+30. Training stopped; the state before this step (weights, "
        f"optimiser, batch-norm statistics) is saved in {path}")
    saved = load_checkpoint(path)
    assert saved["global_step"] == 1 and len(record.before) == 2
    # The weights and batch-norm statistics before the bad step, although its forward pass had
    # already overwritten the statistics.
    assert same(saved["state_dict"], record.before[1])
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())


def test_skipped_non_finite_steps_leave_the_model_untouched():
    guard, record = NonFiniteGuard("skip", "unused"), RecordStates()
    module = fit_tiny(guard, record)
    # 6 steps: the first one updates, every later one is non-finite and skipped.
    assert guard.skipped == 5 and guard.state_dict() == {"skipped": 5}
    assert len(record.before) == 6
    for before in record.before[2:]:
        assert same(before, record.before[1])
    assert same(module.state_dict(), record.before[1])
    sane = RecordStates()
    fit_tiny(NonFiniteGuard("skip", "unused"), sane, lr=0.01)
    assert not same(sane.before[-1], sane.before[1])  # at a sane rate, the same steps do update


def test_huge_finite_gradients_pass_and_weights_already_non_finite_stop_even_a_skipping_run(tmp_path):
    module = tiny_bn_module(lr=1.0)
    saved = []
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), global_step=7, current_epoch=2,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
                              save_checkpoint=lambda path, weights_only: saved.append(path))
    optimizer = torch.optim.SGD(module.parameters(), lr=1e30)
    for param in module.parameters():
        param.grad = torch.full_like(param, 3e38)  # every sum overflows, every element is finite
    NonFiniteGuard("stop", str(tmp_path)).on_before_optimizer_step(trainer, module, optimizer)
    assert not saved
    head = module.net.head[2]
    with torch.no_grad():
        head.weight[0, 0] = float("inf")  # what an overflowing update leaves
    head.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite the gradient of net\.head\.2\.weight at global step 7 "
                                                 r"\(epoch 2\), learning rate 1e\+30; parameter net\.head\.2\.weight "
                                                 r"was already non-finite before this step: an earlier update "
                                                 r"overflowed.*skipping cannot help once the weights are non-finite"):
        NonFiniteGuard("skip", str(tmp_path)).on_before_optimizer_step(trainer, module, optimizer)
    assert saved == [tmp_path / "nonfinite-step000007.ckpt"]


def load_checkpoint_weights(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["state_dict"]["w"]


def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def disk_full_half_way(obj, handle):
        handle.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_half_way)
    with pytest.raises(OSError, match="No space left on device"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_weights(path), torch.ones(3))
    assert [item.name for item in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_checkpoints_are_renamed_into_place_from_their_own_folder(tmp_path, monkeypatch):
    # A rename within one folder is atomic; Lightning's own save renames from the system's
    # temporary folder, which becomes a copy where that is another filesystem.
    renames = []
    rename = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (renames.append((Path(source), Path(target))),
                                                               rename(source, target)))
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    [(source, target)] = renames
    assert target == path and source.parent == path.parent and source.suffix == ".partial"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert torch.equal(load_checkpoint_weights(path), torch.ones(3))
    trainer = instantiate(compose_config("train").trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
