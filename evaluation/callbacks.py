"""Lightning callbacks that measure explanation quality and robustness during training."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from evaluation.engine import (
    DEFAULT_FGSM_EPS,
    LOCALIZATION_METRICS,
    ExplanationEvaluator,
    check_metrics,
    validation_sample,
)
from evaluation.explainers import build_explainer
from evaluation.figures import save_overlay_grid


class ExplanationMetricsCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, score the explanations of the model being trained
    on up to ``max_images`` validation images (PG, SPG, CH on the localisation trials; NQH on
    composites) and log them as ``explain/<metric>``; also save ``overlay_images`` heatmap overlays
    as a picture (and send it to TensorBoard or W&B when those loggers are active).

    On data without masks (ImageNet without box files) the localisation metrics are left out with a warning, and
    on multi-label data FGSM robustness (a top-1 accuracy) is.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("pg", "spg", "ch", "nqh"),
        explainer: str = "gradcam",
        every_n_epochs: int = 1,
        max_images: int | None = 200,
        batch_size: int = 32,
        overlay_images: int = 6,
        tolerance: float = 15,
        spg_samples: int = 100,
        spg_runs: int = 5,
        fgsm_eps: Sequence[float] = DEFAULT_FGSM_EPS,
        seed: int = 0,
    ):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.metrics = check_metrics(metrics)
        self.explainer_name = explainer
        self.explainer = build_explainer(explainer)
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images
        self.batch_size = batch_size
        self.overlay_images = overlay_images
        self.options = dict(tolerance=tolerance, spg_samples=spg_samples, spg_runs=spg_runs,
                            fgsm_eps=tuple(fgsm_eps), seed=seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not getattr(datamodule, "has_localization", False):
            dropped = [name for name in self.metrics if name in LOCALIZATION_METRICS]
            if dropped:
                rank_zero_warn(f"{type(self).__name__}: {type(datamodule).__name__} has no masks or boxes; "
                               f"metrics {dropped} are not computed")
            self.metrics = [name for name in self.metrics if name not in LOCALIZATION_METRICS]
        if pl_module.hparams.multilabel and "fgsm" in self.metrics:
            rank_zero_warn(f"{type(self).__name__}: FGSM robustness is top-1 accuracy, defined for "
                           "single-label data; it is not computed on multi-label data")
            self.metrics = [name for name in self.metrics if name != "fgsm"]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.metrics or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        evaluator = ExplanationEvaluator(self.explainer, self.metrics, pl_module.hparams.num_classes,
                                         pl_module.hparams.multilabel, **self.options)
        results = evaluator.run(pl_module.net, trainer.datamodule, self.max_images, self.batch_size,
                                rank=trainer.global_rank, world_size=trainer.world_size, progress=False)
        # Already reduced over processes by the metrics' own sync.
        for name, value in flatten(results).items():
            pl_module.log(f"explain/{name}", value, rank_zero_only=True)
        rank_zero_info(f"epoch {trainer.current_epoch}: " + ", ".join(
            f"{name}={value:.2f}" for name, value in flatten(results).items() if not name.startswith("skipped")))
        if self.overlay_images > 0:
            # trainer.log_dir is a collective call under DDP: every process asks for it.
            folder = Path(trainer.default_root_dir if trainer.log_dir is None else trainer.log_dir, "explanations")
            if trainer.is_global_zero:
                self.save_overlays(trainer, pl_module, folder)

    def save_overlays(self, trainer: pl.Trainer, pl_module: pl.LightningModule, folder: Path) -> None:
        datamodule = trainer.datamodule
        batch = validation_sample(datamodule, self.overlay_images)
        images = batch["image"].to(pl_module.device)
        targets = batch["target"]
        classes = (targets if targets.dim() == 1 else targets.float().argmax(1)).to(pl_module.device)
        was_training = pl_module.net.training
        pl_module.net.eval()
        heatmaps = self.explainer(pl_module.net, images, classes)
        pl_module.net.train(was_training)
        names = getattr(datamodule, "class_names", None)
        panels = [(image, heat, names[int(c)] if names else str(int(c))) for image, heat, c in zip(images, heatmaps, classes)]
        folder.mkdir(parents=True, exist_ok=True)
        path = save_overlay_grid([(self.explainer_name, panels)], folder / f"epoch{trainer.current_epoch:03d}.png",
                                 f"{self.explainer_name}, epoch {trainer.current_epoch}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                picture = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("explain/overlays", picture, trainer.global_step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("explain/overlays", [str(path)], step=trainer.global_step)


class FGSMRobustnessCallback(ExplanationMetricsCallback):
    """Every ``every_n_epochs`` validation epochs, top-1 accuracy under FGSM for each eps (in 1/255
    units) on up to ``max_images`` validation images, logged as ``explain/fgsm/eps=<eps>``."""

    def __init__(self, eps: Sequence[float] = DEFAULT_FGSM_EPS, every_n_epochs: int = 1,
                 max_images: int | None = 200, batch_size: int = 32, seed: int = 0):
        super().__init__(metrics=("fgsm",), every_n_epochs=every_n_epochs, max_images=max_images,
                         batch_size=batch_size, overlay_images=0, fgsm_eps=eps, seed=seed)


def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"fgsm": {"eps=1": 50.0}}`` -> ``{"fgsm/eps=1": 50.0}``."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat
