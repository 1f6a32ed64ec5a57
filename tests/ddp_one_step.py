"""One GC optimisation step under Lightning DDP on 2 CPU processes (gloo); run by test_ddp.py.

Usage: ``python -m tests.ddp_one_step OUT_DIR COMPOSITES`` (``loss.composites``). Each rank saves
its batch, the composite layout it drew and its parameters after the step to
``OUT_DIR/rank{r}.pt``; rank 0 also saves the initial parameters. Lightning's subprocess launcher
re-runs this module for rank 1.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import gcmodels.objectives.gc
from gcmodels.module import GCClassifier
from tests.conftest import tiny_net

NUM_CLASSES = 4
NUM_IMAGES = 8
LAMBDA = 5.0
OPTIMIZER = {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4}


class FixedImages(Dataset):
    """8 fixed random images, labels 0, 0, 1, 1, ..., 3, 3; DistributedSampler gives rank r items r,
    r+2, ..., so each rank holds classes 0..3: one shared composite under ``loss.composites=shared``."""

    def __init__(self):
        generator = torch.Generator().manual_seed(123)
        self.images = torch.rand(NUM_IMAGES, 3, 12, 12, generator=generator, dtype=torch.float64)
        self.targets = torch.arange(NUM_IMAGES) // 2

    def __len__(self):
        return NUM_IMAGES

    def __getitem__(self, index):
        return {"image": self.images[index], "target": self.targets[index]}


def build_module(composites: str) -> GCClassifier:
    torch.manual_seed(0)
    return GCClassifier(
        model={"name": "tiny", "pooling": "avg", "pretrained": False, "output_stride": None},
        loss={"name": "gc", "lambda": LAMBDA, "cam_mode": "elementwise", "detach_target": False,
              "positive": "instances", "composite_source": "batch", "composites": composites},
        optimizer=OPTIMIZER, scheduler={"name": "none"}, num_classes=NUM_CLASSES, multilabel=False, layout_seed=0,
        net=tiny_net(NUM_CLASSES).double(),
    )


def main(out_dir: Path, composites: str) -> None:
    recorded = {}
    layout_function = "shared_layout" if composites == "shared" else "random_layout"
    draw_layout = getattr(gcmodels.objectives.gc, layout_function)

    def recording_layout(*args, **kwargs):
        recorded["layout"] = draw_layout(*args, **kwargs)
        return recorded["layout"]

    setattr(gcmodels.objectives.gc, layout_function, recording_layout)
    module = build_module(composites)
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}

    class RecordBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorded["batch"] = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, precision="64-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RecordBatch()], use_distributed_sampler=True,
    )
    loader = DataLoader(FixedImages(), batch_size=NUM_IMAGES // 2, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    layout = recorded["layout"]
    torch.save(
        {
            "initial": initial,
            "after": {k: v.detach().clone() for k, v in module.net.state_dict().items()},
            "batch": recorded["batch"],
            "layout": dataclasses.asdict(layout),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
