"""Lightning callbacks that measure explanation quality and robustness during training."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pydantic import Field
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from evaluation.evaluator import Explainer, ExplanationEvaluator
from evaluation.explainers import EXPLAINERS, build_explainer, check_explainer
from evaluation.figures import save_overlay_grid
from evaluation.metrics.registry import METRICS, MetricNames
from evaluation.panels import explanation_panels
from evaluation.preflight import unsupported_metrics
from evaluation.sampling import validation_sample
from evaluation.settings import EvaluationSettings
from gcmodels.options import Options, plain


class EvaluationCallbackOptions(Options):
    """The options of an evaluation callback (``callbacks.<name>``), validated by train.py."""

    # The evaluation group (${evaluation}): validated as such.
    settings: Any
    every_n_epochs: Annotated[int, Field(ge=1)]
    max_images: Annotated[int, Field(ge=1)] | None


class ExplanationMetricsOptions(EvaluationCallbackOptions):
    metrics: MetricNames
    # The explainer group, composed by Hydra (explainer@callbacks.explanation_metrics.explainer=<name>).
    explainer: EXPLAINERS.union()
    overlay_images: Annotated[int, Field(ge=0)]


class EvaluationCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, evaluate the model being trained with ``metrics``
    on up to ``max_images`` validation images and log the results as ``explain/<name>``
    (fractions in [0, 1], already reduced over DDP processes by the metrics' own sync).
    Metrics the data cannot serve are left out with a warning. The evaluator is built once the
    data is known (``setup``) and serves every epoch."""

    def __init__(self, metrics: Sequence[str], explainer: Explainer | None, settings: EvaluationSettings,
                 every_n_epochs: int, max_images: int | None):
        self.metrics = list(metrics)
        self.explainer = explainer
        self.settings = settings
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images
        self.evaluator: ExplanationEvaluator | None = None

    # Where the callback's explainer sits in the train config, for errors raised after Hydra built it.
    explainer_key = "callbacks.explanation_metrics.explainer"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.explainer is not None:
            # Before the sanity check and the first step: a layer typo must not cost an epoch.
            check_explainer(self.explainer, pl_module.net, self.explainer_key)
        datamodule = trainer.datamodule
        dropped = unsupported_metrics(datamodule, self.metrics, self.settings.trial_geometry)
        for name, reason in dropped.items():
            rank_zero_warn(f"{type(self).__name__}: metric {name!r} is not computed: it {reason}")
        metrics = [name for name in self.metrics if name not in dropped]
        if metrics:
            self.evaluator = ExplanationEvaluator(self.explainer, metrics, datamodule.num_classes,
                                                  datamodule.multilabel, self.settings)

    def logged_scores(self, multilabel: bool) -> dict[str, bool]:
        """The scores this callback logs (``explain/<name>``), each with whether higher is better;
        a superset where the data cannot serve a metric (``setup`` leaves it out). What it logs
        besides (counts, spreads, the reference maps' scores) ranks no model."""
        return {f"explain/{name}": METRICS[metric].score(name).higher_is_better for metric in self.metrics
                for name in METRICS[metric].logged_scores(self.settings, multilabel)}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.evaluator is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        results = flatten(self.evaluator.run(pl_module.net, trainer.datamodule, self.max_images,
                                             rank=trainer.global_rank, world_size=trainer.world_size,
                                             progress=False))
        for name, value in results.items():
            pl_module.log(f"explain/{name}", value, rank_zero_only=True)
        rank_zero_info(f"epoch {trainer.current_epoch}: " + ", ".join(
            f"{name}={value:.4f}" for name, value in results.items() if not name.startswith("skipped")))
        self.after_evaluation(trainer, pl_module)

    def after_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook for work after the logged evaluation (pictures)."""


class ExplanationMetricsCallback(EvaluationCallback):
    """Explanation quality of the model being trained (PG, SPG, CH on the localisation trials;
    NQH on composites) with ``explainer``, plus ``overlay_images`` heatmap overlays saved as a
    picture under the logger's folder (and sent to TensorBoard or W&B when those are active)."""

    options = ExplanationMetricsOptions

    def __init__(self, settings: EvaluationSettings, metrics: Sequence[str], explainer: Mapping,
                 every_n_epochs: int, max_images: int | None, overlay_images: int):
        """``explainer``: the explainer group (its name and options)."""
        options = plain(explainer)
        super().__init__(metrics, build_explainer(**options), settings, every_n_epochs, max_images)
        self.explainer_name = options["name"]
        self.overlay_images = overlay_images

    def after_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.overlay_images <= 0:
            return
        # trainer.log_dir is a collective call under DDP: every process asks for it.
        folder = Path(trainer.default_root_dir if trainer.log_dir is None else trainer.log_dir, "explanations")
        if trainer.is_global_zero:
            self.save_overlays(trainer, pl_module, folder)

    def save_overlays(self, trainer: pl.Trainer, pl_module: pl.LightningModule, folder: Path) -> None:
        datamodule = trainer.datamodule
        panels = explanation_panels(pl_module.net, self.explainer, validation_sample(datamodule, self.overlay_images),
                                    datamodule.class_names)
        folder.mkdir(parents=True, exist_ok=True)
        path = save_overlay_grid([(self.explainer_name, panels)], folder / f"epoch{trainer.current_epoch:03d}.png",
                                 f"{self.explainer_name}, epoch {trainer.current_epoch}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                picture = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("explain/overlays", picture, trainer.global_step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("explain/overlays", [str(path)], step=trainer.global_step)


class FGSMRobustnessCallback(EvaluationCallback):
    """Top-1 accuracy under FGSM for each eps of ``settings.fgsm_eps`` (1/255 units), logged as
    ``explain/fgsm/eps=<eps>``, the attack's success rate among the images correct before it as
    ``explain/fgsm_success/eps=<eps>`` (lower is better), and their clean top-1 as
    ``explain/fgsm_clean``. The attack explains nothing: no explainer."""

    options = EvaluationCallbackOptions

    def __init__(self, settings: EvaluationSettings, every_n_epochs: int, max_images: int | None):
        super().__init__(("fgsm",), None, settings, every_n_epochs, max_images)


def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"fgsm": {"eps=1": 0.5}}`` -> ``{"fgsm/eps=1": 0.5}``."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat
