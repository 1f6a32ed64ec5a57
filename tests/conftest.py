"""Helpers shared by the tests: tiny networks, and running ``python train.py`` on tiny data."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from gcmodels.networks import ExplainableNet, build_network

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=64", "data.object_scale=[0.3,0.5]", "data.num_classes=3", "data.train_per_class=4",
    "data.val_per_class=2", "data.batch_size=6", "data.num_workers=0", "trainer.max_epochs=1", "heatmap_images=2",
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


# How a script is started: one process, or torchrun's two (each sees LOCAL_WORLD_SIZE).
PYTHON = (sys.executable,)
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2")


def module_command(module: str, out: Path, data_dir: Path, *overrides: str, launcher=PYTHON) -> list[str]:
    """``python -m module`` (a Hydra script that reads ``data``) on the tiny synthetic data, as
    ``launcher`` starts it."""
    return [*launcher, "-m", module, f"hydra.run.dir={out}", f"data.data_dir={data_dir}",
            *[item for item in TINY if item.startswith("data.")], *overrides]


def run_module(module: str, out: Path, data_dir: Path, *overrides: str, launcher=PYTHON) -> subprocess.CompletedProcess:
    """Run :func:`module_command`."""
    return subprocess.run(module_command(module, out, data_dir, *overrides, launcher=launcher), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


# Data read from disk in its distributed format (tests/formats.py), at a size for the CPU.
REAL_DATA = ["data.image_size=64", "data.batch_size=4", "data.num_workers=0"]


def evaluate_script(out: Path, data: str, data_dir: Path, checkpoint, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m evaluation`` of ``checkpoint`` on ``data`` read from ``data_dir``."""
    command = [sys.executable, "-m", "evaluation", f"hydra.run.dir={out}", f"data={data}", f"data.data_dir={data_dir}",
               *REAL_DATA, f"ckpt_path={checkpoint}", "heatmap_images=2", "heatmap_composites=1", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


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


def tiny_net(num_classes: int = 4, channels: int = 4, smooth: bool = True) -> ExplainableNet:
    """conv -> (tanh|relu) -> [explained layer] -> 1x1 conv -> tanh -> avg pool -> linear.

    The non-linear head makes dy/dA depend on A, so the second-order terms of the GC loss are
    not trivial; tanh keeps everything smooth for ``gradcheck``."""
    act = nn.Tanh if smooth else nn.ReLU
    features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), act())
    head = nn.Sequential(
        nn.Conv2d(channels, channels, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        nn.Linear(channels, num_classes),
    )
    return ExplainableNet(features, head)


# A ViT small enough for float64 and finite differences: 4x4 patches of 8 px at 32 px.
SMALL_VIT = {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32, "image_size": 32}


def small_vit(num_classes: int, **sizes) -> ExplainableNet:
    """``model=vit`` of :data:`SMALL_VIT` (``sizes`` replace some) with a random classifier:
    torchvision initialises a ViT's classifier to zeros, which makes every logit and Grad-CAM
    map 0 until training moves it, and a comparison of them vacuous."""
    net = build_network("vit", num_classes, **{**SMALL_VIT, **sizes})
    nn.init.normal_(net.head.heads.head.weight, std=0.5)
    return net


class FunctionalNet:
    """An ExplainableNet whose parameters are the given tensors (``state``, by name), for gradcheck."""

    def __init__(self, net: ExplainableNet, state: dict[str, torch.Tensor]):
        self.net, self.state = net, state
        self.normalize = net.normalize
        self.to_grid = net.to_grid

    def _call(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        sub = {k[len(prefix) + 1:]: v for k, v in self.state.items() if k.startswith(prefix + ".")}
        return torch.func.functional_call(getattr(self.net, prefix), sub, (x,))

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        return self._call("features", normalized)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(images))

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        return self._call("head", activations)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def gradcheck_in_weights(net: ExplainableNet, loss: Callable[[FunctionalNet], torch.Tensor]) -> bool:
    """gradcheck of ``loss`` (of a network) w.r.t. every weight of the float64 ``net``: for an
    objective built on Grad-CAM with ``create_graph=True`` its analytic gradient is the
    second-order backward through dy/dA, compared to finite differences."""
    names = [name for name, _ in net.named_parameters()]

    def objective(*weights):
        return loss(FunctionalNet(net, dict(zip(names, weights))))

    return torch.autograd.gradcheck(objective, [p.detach().clone().requires_grad_() for p in net.parameters()],
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


def linear_net(in_features: int, num_classes: int) -> ExplainableNet:
    torch.manual_seed(0)
    return ExplainableNet(nn.Identity(), nn.Sequential(nn.Flatten(1), nn.Linear(in_features, num_classes))).double()


def fgsm_case(multilabel: bool):
    net = linear_net(3 * 5 * 4, 6)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 5, 4, generator=generator, dtype=torch.float64)
    images[0, 0] = 0.0  # pixels at both bounds exercise the clipping
    images[1, 1] = 1.0
    if multilabel:
        targets = (torch.rand(8, 6, generator=generator) < 0.3).double()
    else:
        targets = torch.randint(0, 6, (8,), generator=generator)
    return net, images, targets
