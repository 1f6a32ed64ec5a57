"""The LightningModule: one classifier, trained with cross-entropy (``ce``) or with the GC loss (``gc``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from gcmodels.accuracy import PER_CLASS_F1_NAME, accuracy_inputs, accuracy_metric, accuracy_name, per_class_f1_metric
from gcmodels.checkpoints import load_checkpoint
from gcmodels.networks import ExplainableNet, network_from_config
from gcmodels.objectives import OBJECTIVES
from gcmodels.optim import build_optimizers
from gcmodels.random_state import gather_per_rank, global_random_state, set_global_random_state
from losses import classification_loss


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
        self.net = net if net is not None else network_from_config(model, num_classes)
        self.objective = OBJECTIVES[loss["name"]].build(**{key: value for key, value in loss.items() if key != "name"})
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
            rank_zero_warn(f"{reason}: layouts, shuffling and augmentation restart from "
                           f"seed={self.hparams.layout_seed}, so the resumed run will not match an "
                           f"uninterrupted one exactly")
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
        self.objective.check_batch(self.hparams.loss["name"], batch)
        step = self.objective.step(self, batch)
        loss, logits = step.loss, step.logits
        self.loss_terms = {name: term.detach() for name, term in step.terms.items()}
        for name, term in step.terms.items():
            self.log(name, term, on_step=True, on_epoch=True, sync_dist=True, batch_size=size)
        for name, total in step.sums.items():
            self.log(name, total, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True, batch_size=size)
        for name, mean in step.means.items():
            self.log(name, mean, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
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
