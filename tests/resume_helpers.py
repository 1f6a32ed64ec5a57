"""Callbacks that tests/test_resume.py adds to ``python train.py`` runs with
``+callbacks.<name>._target_=tests.resume_helpers.<Class>``."""
from __future__ import annotations

import hashlib
import json
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch


def digest(state) -> str:
    return hashlib.sha256(state.numpy().tobytes() if isinstance(state, torch.Tensor) else pickle.dumps(state)
                          ).hexdigest()[:16]


class RandomStateProbe(pl.Callback):
    """Draws from every global stream after each validation, as evaluation callbacks may (they
    iterate DataLoaders, which draw from torch's), and appends to ``path`` at each epoch's first
    training batch a digest of every stream training reads: the streams a resumed run must
    continue exactly where the uninterrupted one is at that point."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.rand(3)
        np.random.rand(3)
        random.random()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx:
            return
        record = {"epoch": trainer.current_epoch, "torch": digest(torch.get_rng_state()),
                  "numpy": digest(np.random.get_state()), "python": digest(random.getstate()),
                  "layout": digest(pl_module.layout_generator().get_state())}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class SlowSteps(pl.Callback):
    """Sleeps ``seconds`` after every training step, then appends the global step to ``marker``:
    time for a test to signal the process mid-epoch, and a sign that a step has finished."""

    def __init__(self, seconds: float, marker: str):
        self.seconds = seconds
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        time.sleep(self.seconds)
        with self.marker.open("a") as handle:
            handle.write(f"{trainer.global_step}\n")
