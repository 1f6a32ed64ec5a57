"""Lightning callbacks that measure explanation quality and robustness during training."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import check_integer
from evaluation.consensus import committee as committee_lib
from evaluation.consensus import core as consensus_core
from evaluation.consensus.store import ExplanationStore
from evaluation.engine import (Explainer, ExplanationEvaluator, check_checkpoint_explainer, check_metrics,
                               check_trained_classes, unsupported_metrics, validation_sample)
from evaluation.explainers import build_explainer, check_explainer, explainer_options
from evaluation.figures import save_overlay_grid
from evaluation.metrics.registry import METRICS
from evaluation.panels import explanation_panels
from evaluation.settings import EvaluationSettings
from gcmodels.checkpoints import read_hparams


class EvaluationCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, evaluate the model being trained with ``metrics``
    on up to ``max_images`` validation images and log the results as ``explain/<name>``
    (fractions in [0, 1], already reduced over DDP processes by the metrics' own sync).
    Metrics the data cannot serve are left out with a warning. The evaluator is built once the
    data is known (``setup``) and serves every epoch."""

    def __init__(self, metrics: Sequence[str], explainer: Explainer | None, settings: EvaluationSettings,
                 every_n_epochs: int, max_images: int | None):
        # The leaf names only: Hydra's error adds the callback's own key (full_key: callbacks.<name>).
        check_integer("every_n_epochs", every_n_epochs, 1)
        if max_images is not None:
            check_integer("max_images", max_images, 1)
        self.metrics = check_metrics(metrics)
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

    def __init__(self, settings: EvaluationSettings, metrics: Sequence[str], explainer: str | Mapping,
                 every_n_epochs: int, max_images: int | None, overlay_images: int):
        """``explainer``: a name of ``conf/explainer/``, or a mapping of its name and options."""
        options = explainer_options(explainer)
        super().__init__(metrics, build_explainer(**options), settings, every_n_epochs, max_images)
        self.explainer_name = options["name"]
        self.overlay_images = check_integer("overlay_images", overlay_images, 0)

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


class ConsensusCallback(pl.Callback):
    """At the end of training, score the trained model against a committee of checkpoints
    (``committee``: one or more paths): every member and the model explain the same validation
    images with ``explainer``; the model's consensus score (mean similarity to the consensus of all,
    itself included) and its rank among the ``len(committee) + 1`` are logged as
    ``consensus/score`` and ``consensus/rank``. Committee members' explanations come from the store
    of ``python -m evaluation.consensus`` (``store_dir``), shared with the script for the same data,
    explainer and options. Runs on the main process only; its metrics do not sync."""

    def __init__(self, committee: str | Sequence[str], data: Mapping, explainer: str | Mapping,
                 settings: EvaluationSettings, num_images: int | None, target: str, resolution: int | None,
                 sigma: float, aggregation: str, store_dir: str):
        # Everything is checked here, before training: a typo must not cost the run.
        self.committee = committee_lib.find_checkpoints(committee, None) if committee else []
        if not self.committee:
            raise ValueError("callbacks.consensus.committee: give at least one checkpoint to compare with")
        missing = [str(path) for path in self.committee if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"callbacks.consensus.committee: checkpoint(s) not found: {missing}")
        committee_lib.check_image_options(target, num_images, resolution, prefix="callbacks.consensus.")
        # Plain containers: the data config keys the explanation store's digest (JSON).
        self.data = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
        self.explainer_options = explainer_options(explainer)
        self.explainer = build_explainer(**self.explainer_options)
        self.options = committee_lib.consensus_options(committee_lib.explanation_kind(self.explainer), sigma,
                                                       aggregation)
        self.settings = settings
        self.num_images = num_images
        self.target = target
        self.resolution = resolution
        self.store_dir = store_dir
        # Last, as the slowest check: a file that is not a checkpoint of this project. Its classes
        # are compared with the data's in setup, once the data is known.
        self.member_hparams = {}
        for path in self.committee:
            try:
                self.member_hparams[path] = read_hparams(path)
            except ValueError as err:
                raise ValueError(f"callbacks.consensus.committee: {err}") from err

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the first training step, on every process (one refusing alone would leave the
        # others waiting): a member of other classes, or whose network lacks the explainer's
        # layer, must not cost the run.
        check_explainer(self.explainer, pl_module.net, "callbacks.consensus.explainer")
        for path, hparams in self.member_hparams.items():
            try:
                check_trained_classes(path, hparams, trainer.datamodule)
            except ValueError as err:
                raise ValueError(f"callbacks.consensus.committee: {err}") from None
            check_checkpoint_explainer(self.explainer, path, hparams, "callbacks.consensus.explainer")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        # Read now, not at setup: a member's file (another run's last.ckpt) may have been rewritten
        # during the training, and the store keys explanations by the weights' digest.
        members = committee_lib.load_members(self.committee, datamodule, minimum=1)
        images = committee_lib.committee_images(datamodule, self.num_images)
        resolution = committee_lib.effective_resolution(self.resolution, datamodule)
        store = ExplanationStore(self.store_dir, committee_lib.run_settings(
            self.data, self.explainer_options, self.target, resolution, self.settings.batch_size, len(images)))
        shared = committee_lib.stored_shared_arrays(store, images, datamodule, self.explainer, self.settings.batch_size)
        entries = [committee_lib.member_entry(member, store, self.explainer, images, datamodule, shared, self.target,
                                              resolution, self.settings, pl_module.device)[0]
                   for member in members]
        was_training = pl_module.net.training
        pl_module.net.eval()
        try:
            own, _ = committee_lib.explain_member(pl_module.net, self.explainer, images, datamodule, shared,
                                                  self.target, resolution, self.settings.batch_size)
        finally:
            pl_module.net.train(was_training)
        kind = committee_lib.explanation_kind(self.explainer)
        scores = consensus_core.consensus_scores(
            committee_lib.similarities(entries + [own], shared, kind, self.options))
        results = {"consensus/score": float(scores[-1]), "consensus/rank": float(consensus_core.ranks(scores)[-1]),
                   "consensus/committee_size": float(len(scores))}
        for logger in trainer.loggers:
            logger.log_metrics(results, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in results.items()})
        rank_zero_info("consensus with the committee: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
