"""Every evaluation metric of one network on 2 CPU processes (gloo); run by test_ddp_evaluation.py.

Usage: ``python -m tests.ddp_evaluation DATA_DIR OUT_DIR``. Two processes (torch.multiprocessing)
join one process group and run ``ExplanationEvaluator.run`` with their rank; torchmetrics sums
the states over both in ``compute()``, and each rank writes the results to
``OUT_DIR/rank{r}.json``. :func:`evaluate` is also the test's one-process reference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datamodules.synthetic import SyntheticDataModule
from evaluation.evaluator import ExplanationEvaluator
from evaluation.explainers import build_explainer
from evaluation.metrics.registry import METRICS
from evaluation.settings import default_settings
from gcmodels.config import compose_group
from tests.conftest import tiny_net

NUM_CLASSES = 3
# 9 validation images (3 per class), 7 of them evaluated: an odd count, which 2 processes
# cannot share evenly.
DATA = dict(num_classes=NUM_CLASSES, image_size=48, train_per_class=1, val_per_class=3, object_scale=(0.3, 0.5),
            decoys=(1, 2), context_bias=0.0, seed=0, batch_size=4, num_workers=0, skip_corrupt=False)
MAX_IMAGES = 7
WORLD_SIZE = 2


class ToDouble(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.double()


def datamodule(data_dir: Path) -> SyntheticDataModule:
    module = SyntheticDataModule(data_dir, **DATA)
    module.prepare_data()
    module.setup("validate")
    return module


def network() -> nn.Module:
    """The tiny net in float64: its per-image maps then agree across batch sizes to ~1e-16, so no
    SPG point or PG maximum moves with the batch's composition. Its weights (seed 1) leave no map
    all zero and let FGSM change some predictions, so every metric scores something."""
    torch.manual_seed(1)
    net = tiny_net(NUM_CLASSES, channels=8).double()
    net.normalize = ToDouble()
    return net


def evaluate(data_dir: Path, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
    evaluator = ExplanationEvaluator(build_explainer(**compose_group("explainer", "gradcam")), METRICS, NUM_CLASSES,
                                     False, default_settings(seed=0, batch_size=batch_size))
    return evaluator.run(network(), datamodule(data_dir), max_images=MAX_IMAGES, rank=rank, world_size=world_size,
                         progress=False)


def worker(rank: int, data_dir: Path, out_dir: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = evaluate(data_dir, DATA["batch_size"], rank, WORLD_SIZE)
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    mp.spawn(worker, args=(Path(sys.argv[1]), Path(sys.argv[2])), nprocs=WORLD_SIZE)
