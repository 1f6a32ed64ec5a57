"""One GC or CGC optimisation step under Lightning DDP on 2 CPU processes (gloo); run by test_ddp.py.

Usage: ``python -m tests.ddp_one_step OUT_DIR MODE``: MODE is ``loss.composites`` of a GC step
(``per_sample``, ``shared``) or ``cgc`` for a CGC step. Each rank saves its batch, the composite
layout it drew (GC) and its parameters after the step to ``OUT_DIR/rank{r}.pt``; rank 0 also saves
the initial parameters. Lightning's subprocess launcher
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
CGC_LOSS = {"name": "cgc", "lambda": LAMBDA, "temperature": 0.5, "target": "prediction", "contrast": True,
            "cam_mode": "elementwise"}
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


class FixedViews(FixedImages):
    """FixedImages with fixed CGC views (datamodules.views.ContrastiveViews' fields)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.views = torch.rand(NUM_IMAGES, 2, 3, 12, 12, generator=generator, dtype=torch.float64)
        sides = torch.randint(4, 13, (NUM_IMAGES, 2), generator=generator)
        corners = (torch.rand(NUM_IMAGES, 2, generator=generator) * (13 - sides)).long()
        self.boxes = torch.cat([corners, sides], dim=1)
        self.flips = torch.arange(NUM_IMAGES) % 3 == 0

    def __getitem__(self, index):
        return {**super().__getitem__(index), "view": self.views[index, 0], "augmented": self.views[index, 1],
                "box": self.boxes[index], "flip": self.flips[index]}


def build_module(mode: str) -> GCClassifier:
    torch.manual_seed(0)
    loss = (CGC_LOSS if mode == "cgc" else
            {"name": "gc", "lambda": LAMBDA, "cam_mode": "elementwise", "detach_target": False,
             "positive": "instances", "composite_source": "batch", "composites": mode})
    return GCClassifier(
        model={"name": "tiny", "pooling": "avg", "pretrained": False, "output_stride": None},
        loss=loss,
        optimizer=OPTIMIZER, scheduler={"name": "none"}, num_classes=NUM_CLASSES, multilabel=False, layout_seed=0,
        net=tiny_net(NUM_CLASSES).double(),
    )


def main(out_dir: Path, mode: str) -> None:
    recorded = {}
    layout_function = "shared_layout" if mode == "shared" else "random_layout"
    draw_layout = getattr(gcmodels.objectives.gc, layout_function)

    def recording_layout(*args, **kwargs):
        recorded["layout"] = draw_layout(*args, **kwargs)
        return recorded["layout"]

    setattr(gcmodels.objectives.gc, layout_function, recording_layout)
    module = build_module(mode)
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}

    class RecordBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorded["batch"] = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, precision="64-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RecordBatch()], use_distributed_sampler=True,
    )
    loader = DataLoader(FixedViews() if mode == "cgc" else FixedImages(), batch_size=NUM_IMAGES // 2, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    layout = recorded.get("layout")
    torch.save(
        {
            "initial": initial,
            "after": {k: v.detach().clone() for k, v in module.net.state_dict().items()},
            "batch": recorded["batch"],
            "layout": None if layout is None else dataclasses.asdict(layout),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
