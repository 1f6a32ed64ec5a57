"""The LightningModule: one classifier, trained with cross-entropy (``ce``) or with the GC loss (``gc``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score

from datamodules.base import ClassificationDataModule
from gcmodels.checkpoints import load_checkpoint
from gcmodels.networks import ExplainableNet, build_network, native_output_stride
from gcmodels.objective import gc_objective
from gcmodels.optim import build_optimizers
from gcmodels.options import ConfigError
from gcmodels.random_state import gather_per_rank, global_random_state, set_global_random_state
from losses import classification_loss, random_layout, shared_layout
from losses.composite import own_distractors_layout, positive_weights


def accuracy_name(multilabel: bool) -> str:
    """The headline score's name: ``acc`` (top-1), or ``f1`` (micro F1, the COCO papers'
    "F1-Overall") on multi-label data."""
    return "f1" if multilabel else "acc"


# Multi-label data's second score: F1 averaged over the classes (the COCO papers' "F1-PerClass").
PER_CLASS_F1_NAME = "f1_per_class"


def per_class_f1_metric(num_classes: int, **kwargs) -> Metric:
    """Macro F1 at threshold 0.5: each class's F1, averaged, so rare classes count as much as
    frequent ones (micro F1 is dominated by the frequent ones, e.g. COCO's person)."""
    return MultilabelF1Score(num_labels=num_classes, threshold=0.5, average="macro", **kwargs)


def accuracy_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the accuracy metrics take: logits and class indices, or, on multi-label data,
    probabilities and int targets. torchmetrics' multi-label metrics apply the sigmoid only when
    some score lies outside [0, 1]: logits that all happen to lie inside would be thresholded raw."""
    if targets.dim() > 1:
        return logits.sigmoid(), targets.long()
    return logits, targets


def accuracy_metric(num_classes: int, multilabel: bool, **kwargs) -> Metric:
    """The headline score: top-1 accuracy, or micro F1 at threshold 0.5 on multi-label data
    (``kwargs``: torchmetrics' options, e.g. ``sync_on_compute``)."""
    if multilabel:
        return MultilabelF1Score(num_labels=num_classes, threshold=0.5, average="micro", **kwargs)
    return MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro", **kwargs)


class GCClassifier(pl.LightningModule):
    """Image classifier trained with ``loss.name=ce`` or ``gc`` (CE + lambda * Grad-CAM consistency).

    ``model``, ``loss``, ``optimizer`` and ``scheduler`` are the config groups of the same names
    (plain dicts; their values live in ``conf/``). They are stored in the checkpoint's
    hyper-parameters, so a checkpoint rebuilds its own network (:meth:`from_checkpoint`).
    ``class_names`` (stored for the record: checkpoints of different class sets must not be
    compared) may be None where unknown. ``net`` overrides the built network (tests use tiny
    networks).
    """

    def __init__(
        self,
        model: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict,
        num_classes: int,
        multilabel: bool,
        layout_seed: int,
        class_names: list[str] | None = None,
        net: ExplainableNet | None = None,
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else build_network(model["name"], num_classes, model["pooling"],
                                                             model["pretrained"], model["output_stride"])
        self._layout_generator: torch.Generator | None = None
        # The current training step's loss terms, for checks before the optimiser step
        # (gcmodels.callbacks.NonFiniteGuard).
        self.loss_terms: dict[str, torch.Tensor] = {}
        self.train_acc = accuracy_metric(num_classes, multilabel)
        self.val_acc = accuracy_metric(num_classes, multilabel)
        self.val_f1_per_class = per_class_f1_metric(num_classes) if multilabel else None

    @staticmethod
    def validation_metric(multilabel: bool) -> str:
        """The logged validation score that checkpointing watches: top-1 accuracy, or micro F1 on
        multi-label data."""
        return f"val/{accuracy_name(multilabel)}"

    @staticmethod
    def validation_scores(multilabel: bool) -> dict[str, bool]:
        """The scores :meth:`validation_step` logs, each with whether higher is better."""
        return {GCClassifier.validation_metric(multilabel): True, "val/loss": False,
                **({f"val/{PER_CLASS_F1_NAME}": True} if multilabel else {})}

    @property
    def accuracy_name(self) -> str:
        return accuracy_name(self.hparams.multilabel)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu") -> GCClassifier:
        """Load a checkpoint written by this class, rebuilding the network it describes."""
        checkpoint = load_checkpoint(path)
        module = cls(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location)

    def check_data(self, datamodule: ClassificationDataModule, world_size: int) -> None:
        """What loss=gc's 2x2 composites of training images need: an image side that is a whole
        number of the explained layer's cells, and, when the distractors come from the batch, enough
        images in each process's batch (``datamodule.batch_size``) to draw them from."""
        loss, model = self.hparams.loss, self.hparams.model
        if loss["name"] != "gc":
            return
        size, name = datamodule.image_size, model["name"]
        stride = native_output_stride(name) if model["output_stride"] is None else model["output_stride"]
        if size % stride:
            # composite_target puts each image's map at the composite map's edges, where the image's
            # own cells are only when its side is a multiple of the stride.
            raise ConfigError([("data.image_size", (
                f"{size} is not a multiple of model.output_stride={stride} ({name}'s explained layer has a cell "
                f"per {stride} pixels): loss=gc places each image's Grad-CAM map in its cell of the 2x2 "
                f"composite's map, which matches the image's own cells only at a multiple; use "
                f"data.image_size={math.ceil(size / stride) * stride} or another model.output_stride"))])
        if loss["composite_source"] == "batch":
            shared = loss["composites"] == "shared"
            needed = 4 if shared else 2
            if datamodule.batch_size < needed:
                raise ConfigError([("data.batch_size", (
                    f"{datamodule.global_batch_size} gives {datamodule.batch_size} image(s) to each of {world_size} "
                    f"process(es), and loss=gc (loss.composite_source=batch{', loss.composites=shared' if shared else ''}) "
                    f"builds its composites from {needed} images of a process's batch: give data.batch_size >= "
                    f"{needed * world_size} or loss.{'composites=per_sample' if shared else 'composite_source=dataset'}"))])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def layout_generator(self) -> torch.Generator:
        """Per-process random stream for cells and distractors: reproducible for a seed and
        different on each DDP rank."""
        if self._layout_generator is None:
            self._layout_generator = torch.Generator().manual_seed(
                int(self.hparams.layout_seed) * 1000 + self.global_rank
            )
        return self._layout_generator

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Taken as the file is written, i.e. after the epoch's validation and whatever callbacks
        # drew at its end: where a resumed run must pick up every stream. Per process, since each
        # DDP rank draws its own layouts and may consume its global streams differently.
        checkpoint["random_states"] = gather_per_rank({"layout": self.layout_generator().get_state(),
                                                       **global_random_state()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None:  # rebuilt outside training: the caller's random streams are not ours to set
            return
        self._warn_if_the_schedule_keeps_another_length(checkpoint)
        states = checkpoint.get("random_states")
        world_size = self.trainer.world_size
        if states is None or len(states) != world_size:
            reason = ("the checkpoint holds no random states (it predates them)" if states is None else
                      f"the checkpoint holds the random states of {len(states)} processes, this run has {world_size}")
            rank_zero_warn(f"{reason}: layouts, shuffling and augmentation restart from seed={self.hparams.layout_seed}, so "
                           f"the resumed run will not match an uninterrupted one exactly")
            return
        state = states[self.global_rank]
        self.layout_generator().set_state(state["layout"])
        set_global_random_state(state)

    def _warn_if_the_schedule_keeps_another_length(self, checkpoint: dict) -> None:
        """Lightning restores the scheduler's state after this hook, T_max included: a run resumed
        with a larger trainer.max_epochs would see its learning rate rise again past the old end."""
        epochs = self.trainer.max_epochs
        for saved in checkpoint.get("lr_schedulers", []):
            if "T_max" in saved and epochs is not None and epochs > 0 and saved["T_max"] != epochs:
                rank_zero_warn(
                    f"trainer.max_epochs={epochs}, but the checkpoint's cosine schedule spans T_max={saved['T_max']} "
                    f"epochs and the resumed run keeps it (past epoch {saved['T_max']} its learning rate rises "
                    f"again). For a new schedule, start a new run from these weights with "
                    f"model.init_from=<checkpoint> (fresh optimizer and schedule) instead of ckpt_path "
                    f"(docs/checkpoints.md)")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self.loss_terms = {}
        images, targets = batch["image"], batch["target"]
        size = images.shape[0]
        self.log("train/skipped_corrupt", float(batch.get("skipped", 0)), on_step=False, on_epoch=True,
                 reduce_fx="sum", sync_dist=True, batch_size=max(size, 1))
        if size == 0:
            return None
        loss_config = self.hparams.loss
        if loss_config["name"] == "gc":
            distractor_images = None
            if loss_config["composite_source"] == "dataset":
                if "distractors" not in batch:
                    raise ValueError(
                        "loss.composite_source=dataset builds each composite from distractors loaded with its "
                        "sample, but this batch has none: call the datamodule's set_train_distractors "
                        "(train.py does)"
                    )
                layout = own_distractors_layout(batch["positive"], batch["cell"])
                distractor_images = batch["distractors"]
            else:
                weights = positive_weights(batch, self.hparams.multilabel, loss_config["positive"])
                draw = shared_layout if loss_config["composites"] == "shared" else random_layout
                layout = draw(targets, self.hparams.num_classes, self.layout_generator(), weights)
            out = gc_objective(
                self.net, images, targets, layout, float(loss_config["lambda"]),
                loss_config["cam_mode"], loss_config["detach_target"], distractor_images,
            )
            loss, logits = out.loss, out.logits
            self.loss_terms = {"train/ce": out.classification_loss.detach(), "train/gc": out.consistency_loss.detach()}
            self.log("train/gc", out.consistency_loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
            self.log("train/gc_left_out", float(size - out.num_composites), on_step=False, on_epoch=True,
                     reduce_fx="sum", sync_dist=True, batch_size=size)
            if layout.groups is not None:
                # Shared composites: the share of samples no group of four took, trained on a
                # per-sample composite instead (multi-label batches fall back far more often).
                fallback = layout.valid & (layout.groups >= size)
                self.log("train/gc_fallback", fallback.sum() / size, on_step=False, on_epoch=True,
                         sync_dist=True, batch_size=size)
            self.log("train/ce", out.classification_loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        else:
            logits = self.net(images)
            loss = classification_loss(logits, targets)
            self.loss_terms = {"train/ce": loss.detach()}
            self.log("train/ce", loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        self.train_acc(*accuracy_inputs(logits.detach(), targets))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        self.log(f"train/{self.accuracy_name}", self.train_acc, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, targets = batch["image"], batch["target"]
        if images.shape[0] == 0:
            return
        logits = self.net(images)
        self.val_acc(*accuracy_inputs(logits, targets))
        size = images.shape[0]
        self.log("val/loss", classification_loss(logits, targets), sync_dist=True, batch_size=size)
        self.log(f"val/{self.accuracy_name}", self.val_acc, prog_bar=True, batch_size=size)
        if self.val_f1_per_class is not None:
            self.val_f1_per_class(*accuracy_inputs(logits, targets))
            self.log(f"val/{PER_CLASS_F1_NAME}", self.val_f1_per_class, batch_size=size)

    def configure_optimizers(self):
        scheduler = self.hparams.scheduler
        # Only the cosine schedule spans the run: a module without a trainer builds the others.
        epochs = self.trainer.max_epochs if scheduler["name"] == "cosine" else None
        return build_optimizers(self.parameters(), self.hparams.optimizer, scheduler, epochs)
