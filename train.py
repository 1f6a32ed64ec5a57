"""Train a classifier with the Grad-CAM consistency loss (or plain CE): ``python train.py [overrides]``.

Every component is built, and so every config value checked, before any data is generated or read.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from datamodules import DATAMODULES, ClassificationDataModule, build_datamodule
from datamodules.base import check_integer
from evaluation.callbacks import EvaluationCallback
from evaluation.engine import validation_sample
from evaluation.explainers import build_explainer
from evaluation.figures import save_overlay_grid
from evaluation.panels import explanation_panels
from gcmodels.checkpoints import RESUMED_GROUPS, check_resume_compatible, init_from_checkpoint
from gcmodels.module import GCClassifier, cosine_epochs
from gcmodels.networks import UNSTRIDED_STAGES, native_output_stride
from gcmodels.safety import InterruptCheckpoint, NonFiniteGuard


def validation_metric(data_name: str) -> str:
    """The checkpointed validation score of data set ``data_name`` (``${validation_metric:...}``)."""
    if data_name not in DATAMODULES:
        raise ValueError(f"data.name={data_name!r} is unknown; allowed: {sorted(DATAMODULES)}")
    return GCClassifier.validation_metric(DATAMODULES[data_name].multilabel)


OmegaConf.register_new_resolver("validation_metric", validation_metric, replace=True)


def build_module(cfg: DictConfig, datamodule: ClassificationDataModule) -> GCClassifier:
    def group(name: str) -> dict:
        # A required value left at ??? (scheduler=multistep's milestones) is an error naming its key,
        # not the string "???".
        return OmegaConf.to_container(cfg[name], resolve=True, throw_on_missing=True)

    return GCClassifier(
        model=group("model"),
        loss=group("loss"),
        optimizer=group("optimizer"),
        scheduler=group("scheduler"),
        num_classes=datamodule.num_classes,
        multilabel=datamodule.multilabel,
        layout_seed=cfg.seed,
        class_names=list(datamodule.class_names),
    )


def per_process_batch(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch ``data.batch_size`` (the paper's 256 is the batch
    over all GPUs) among the trainer's ``world_size`` processes (devices x nodes)."""
    if batch_size % world_size:
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch, split evenly over the {world_size} processes "
            f"(trainer.devices x trainer.num_nodes), and {world_size} does not divide it: choose a multiple of "
            f"{world_size}"
        )
    return batch_size // world_size


def check_composites(loss: dict, model: dict, datamodule: ClassificationDataModule, world_size: int) -> None:
    """What loss=gc's 2x2 composites of training images need: an image side that is a whole number
    of the explained layer's cells, and, when the distractors come from the batch, enough images in
    each process's batch (``datamodule.batch_size``) to draw them from."""
    if loss["name"] != "gc":
        return
    size, name = datamodule.image_size, model["name"]
    stride = native_output_stride(name) if model["output_stride"] is None else model["output_stride"]
    if size % stride:
        # composite_target puts each image's map at the composite map's edges, where the image's own
        # cells are only when its side is a multiple of the stride.
        strides = [option for option in sorted(UNSTRIDED_STAGES) if not size % option]
        other_stride = ("" if name == "alexnet" or not strides else
                        f", or model.output_stride={' or '.join(map(str, strides))}")
        raise ValueError(
            f"data.image_size={size} is not a multiple of model.output_stride={stride} ({name}'s explained layer has "
            f"a cell per {stride} pixels{', fixed' if name == 'alexnet' else ''}): loss=gc places each image's Grad-CAM "
            f"map in its cell of the 2x2 composite's map, which matches the image's own cells only at a multiple (else "
            f"the target is misplaced, or the composite's map is smaller than two image maps and the first training "
            f"step fails); use data.image_size={math.ceil(size / stride) * stride}{other_stride}")
    if loss["composite_source"] == "batch":
        shared = loss["composites"] == "shared"
        needed = 4 if shared else 2
        if datamodule.batch_size < needed:
            outcome = ("no group of 4 forms, and every image gets a composite of its own as with "
                       "loss.composites=per_sample" if shared else
                       "no composite has a distractor, and the run trains as plain CE")
            raise ValueError(
                f"data.batch_size={datamodule.batch_size * world_size} gives {datamodule.batch_size} image(s) to each "
                f"of {world_size} process(es), and loss=gc (loss.composite_source=batch"
                f"{', loss.composites=shared' if shared else ''}) builds its composites from the images of a "
                f"process's batch: with fewer than {needed}, {outcome}; give data.batch_size >= {needed * world_size}"
                f" or loss.{'composites=per_sample' if shared else 'composite_source=dataset'}")


# ModelCheckpoint's own candidates besides the logged values, in either mode (step with max: keep
# the latest save_top_k checkpoints).
COUNTER_MONITORS = ("epoch", "step")


def validation_scores(datamodule: ClassificationDataModule, callbacks: dict[str, pl.Callback]) -> dict[str, tuple]:
    """Every score logged by the end of a validation epoch, where ModelCheckpoint chooses the best
    checkpoint: whether higher is better, and the name of the callback that logs it (None: the
    module's ``val/*``)."""
    multilabel = datamodule.multilabel
    scores = {name: (higher, None) for name, higher in GCClassifier.validation_scores(multilabel).items()}
    for name, callback in callbacks.items():
        if isinstance(callback, EvaluationCallback):
            scores.update({score: (higher, name) for score, higher in callback.logged_scores(multilabel).items()})
    return scores


def check_checkpoint_monitors(callbacks: dict[str, pl.Callback], datamodule: ClassificationDataModule,
                              trainer: pl.Trainer) -> None:
    """Each ModelCheckpoint's ``monitor`` must be a score logged at every validation, and its
    ``mode`` the direction in which that score improves. Lightning finds out at the end of the
    first epoch, without saving a checkpoint, or never (the best checkpoint is then the worst)."""
    scores = validation_scores(datamodule, callbacks)
    # None: validation every val_check_interval steps, in any epoch.
    validation_epochs = trainer.check_val_every_n_epoch or 1
    for name, callback in callbacks.items():
        if not isinstance(callback, ModelCheckpoint) or callback.monitor in (None, *COUNTER_MONITORS):
            continue
        key, monitor = f"callbacks.{name}", callback.monitor
        if monitor not in scores:
            raise ValueError(f"{key}.monitor={monitor!r} is not a score logged at validation, where the best checkpoint "
                             f"is chosen (counts, spreads and the reference maps' scores rank no model); scores logged "
                             f"there: {sorted(scores)}")
        higher, source = scores[monitor]
        mode = "max" if higher else "min"
        if callback.mode != mode:
            raise ValueError(f"{key}.mode={callback.mode} keeps the checkpoint of the "
                             f"{'highest' if callback.mode == 'max' else 'lowest'} {monitor}, which is better "
                             f"{'higher' if mode == 'max' else 'lower'} ({key}.monitor={monitor}): set {key}.mode={mode}")
        every = 1 if source is None else callbacks[source].every_n_epochs
        if validation_epochs % every:
            raise ValueError(f"{key}.monitor={monitor} is logged every {every} epochs (callbacks.{source}.every_n_epochs), "
                             f"and the best checkpoint is chosen at every validation (every {validation_epochs} "
                             f"epoch(s), trainer.check_val_every_n_epoch): the first one without it fails, saving no "
                             f"checkpoint; callbacks.{source}.every_n_epochs must divide {validation_epochs}")


def warn_unaligned_evaluations(callbacks: dict[str, pl.Callback], trainer: pl.Trainer) -> None:
    """An evaluation callback runs at the end of a validation epoch that is a multiple of its
    ``every_n_epochs``: warn when none comes before the last epoch."""
    validation_epochs, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    if validation_epochs is None or epochs < 1:  # validation by steps; unlimited (-1), or no epoch at all
        return
    for name, callback in callbacks.items():
        if isinstance(callback, EvaluationCallback):
            first = math.lcm(callback.every_n_epochs, validation_epochs)
            if first > epochs:
                rank_zero_warn(f"callbacks.{name}.every_n_epochs={callback.every_n_epochs} with "
                               f"trainer.check_val_every_n_epoch={validation_epochs}: callbacks.{name} would first run "
                               f"at epoch {first}, after the last (trainer.max_epochs={epochs}), and logs nothing")


def load_initial_weights(cfg: DictConfig, module: GCClassifier) -> None:
    """``model.init_from``: start from another checkpoint's network (ImageNet -> COCO in the paper).
    Done here rather than in the module, so that rebuilding a checkpoint of this run
    (:meth:`GCClassifier.from_checkpoint`) takes its own weights and never reads this file again."""
    path = cfg.model.init_from
    notes = init_from_checkpoint(path, module.net, module.hparams.model, module.hparams.num_classes,
                                 module.hparams.class_names)
    rank_zero_info(f"model.init_from: network weights loaded from {path}")
    for note in notes:
        rank_zero_info(f"model.init_from: {note}")


def build_loggers(cfg: DictConfig) -> list:
    if "wandb" in cfg.logger:
        # Never needs a network or an account unless the user asks for it with WANDB_MODE.
        os.environ.setdefault("WANDB_MODE", "offline")
    return [hydra.utils.instantiate(conf) for conf in cfg.logger.values()]


def check_writable(cfg: DictConfig) -> None:
    """Create and write once every folder the run writes to (output, checkpoints, the consensus
    callback's explanation store, loggers), before any data is generated or read: a run must not
    train for hours and then fail to save."""
    folders = {"output_dir": cfg.output_dir}
    for group, key in (("callbacks", "dirpath"), ("callbacks", "store_dir"), ("logger", "save_dir")):
        folders.update({f"{group}.{name}.{key}": conf[key] for name, conf in cfg[group].items() if conf.get(key)})
    for key, folder in folders.items():
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OSError(f"{key}={folder} cannot be written ({type(err).__name__}: {err.strerror or err}); "
                          f"choose a writable folder") from err


def find_callback(trainer: pl.Trainer, kind: type) -> pl.Callback | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, kind)), None)


def summarise(trainer: pl.Trainer, cfg: DictConfig, heatmaps: Path | None) -> dict:
    checkpoint = trainer.checkpoint_callback
    interrupt = find_callback(trainer, InterruptCheckpoint)
    last = interrupt.saved if interrupt and interrupt.saved else checkpoint.last_model_path if checkpoint else None
    guard = find_callback(trainer, NonFiniteGuard)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    summary = {
        "model": cfg.model.name,
        "pooling": cfg.model.pooling,
        "output_stride": cfg.model.output_stride,
        "init_from": cfg.model.init_from,
        "loss": cfg.loss.name,
        "lambda": cfg.loss.get("lambda"),
        "data": cfg.data.name,
        "status": "interrupted" if trainer.interrupted else "finished",
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "batch_size": cfg.data.batch_size,
        "processes": trainer.world_size,
        "metrics": metrics,
        "best_checkpoint": checkpoint.best_model_path if checkpoint else None,
        "best_score": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None,
        "last_checkpoint": str(last) if last else None,
        "nonfinite_skipped": guard.skipped if guard else None,
        "heatmaps": str(heatmaps) if heatmaps else None,
        "output_dir": cfg.output_dir,
    }
    Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [(key, summary[key]) for key in ("status", "model", "pooling", "init_from", "loss", "lambda", "data", "epochs",
                                            "global_step", "nonfinite_skipped")]
    rows.append(("batch", f"{cfg.data.batch_size} ({cfg.data.batch_size // trainer.world_size} per process x "
                          f"{trainer.world_size})"))
    rows += [(name, f"{value:.4f}") for name, value in sorted(metrics.items()) if name.startswith(("val/", "explain/"))]
    rows += [(key, summary[key]) for key in ("best_checkpoint", "last_checkpoint", "heatmaps", "output_dir")]
    width = max(len(name) for name, _ in rows)
    print("\n" + "=" * 30 + " training summary " + "=" * 30)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return summary


def save_heatmaps(module: GCClassifier, datamodule: ClassificationDataModule, cfg: DictConfig) -> Path | None:
    count = int(cfg.heatmap_images)
    if count <= 0:
        return None
    # The Grad-CAM the model was trained with; ce runs, which have none, get the element-wise one.
    explainer = "gradcam_standard" if cfg.loss.get("cam_mode") == "standard" else "gradcam"
    panels = explanation_panels(module.net.cpu(), build_explainer(explainer), validation_sample(datamodule, count),
                                datamodule.class_names)
    return save_overlay_grid([("Grad-CAM", panels)], Path(cfg.output_dir, "heatmaps.png"),
                             f"{explainer} of the labelled class")


# Trainer arguments that Lightning takes untyped ("abc" epochs pass) or checks only when it uses
# them, with the smallest value each accepts (-1: unlimited, or every batch).
TRAINER_INTEGERS = {"max_epochs": -1, "num_sanity_val_steps": -1, "log_every_n_steps": 1, "num_nodes": 1}


def build_run(cfg: DictConfig) -> tuple[ClassificationDataModule, GCClassifier, pl.Trainer]:
    """The datamodule, module and trainer (with its callbacks and loggers) that ``cfg`` describes.
    Every config value is checked here, each error naming its key, before any data is generated
    or read (ImageNet and COCO read only their class names, which the module needs)."""
    check_integer("seed", cfg.seed, 0)
    check_integer("heatmap_images", cfg.heatmap_images, 0)
    for key, minimum in TRAINER_INTEGERS.items():
        if cfg.trainer.get(key) is not None:
            check_integer(f"trainer.{key}", cfg.trainer[key], minimum)
    if cfg.scheduler.name == "cosine" and cfg.trainer.get("max_epochs") is not None:
        cosine_epochs(cfg.trainer.max_epochs)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.model.init_from is not None:
        # Recorded absolute in the checkpoints, so that the record names the file from anywhere.
        cfg.model.init_from = str(Path(cfg.model.init_from).resolve())
    module = build_module(cfg, datamodule)
    callbacks = {name: hydra.utils.instantiate(conf) for name, conf in cfg.callbacks.items()}
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=build_loggers(cfg),
                                                  callbacks=list(callbacks.values()))
    datamodule.batch_size = per_process_batch(cfg.data.batch_size, trainer.world_size)
    check_composites(module.hparams.loss, module.hparams.model, datamodule, trainer.world_size)
    check_checkpoint_monitors(callbacks, datamodule, trainer)
    warn_unaligned_evaluations(callbacks, trainer)
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict | None:
    """Train as configured; returns the summary on the main process (None on other ranks). Ctrl-C
    writes the summary (status interrupted) and exits as Lightning does, with status 1."""
    check_writable(cfg)
    datamodule, module, trainer = build_run(cfg)
    loss = module.hparams.loss
    if loss["name"] == "gc" and loss["composite_source"] == "dataset":
        datamodule.set_train_distractors(loss["positive"])
    if cfg.ckpt_path:
        # Also refuses an init_from other than the resumed run's own: the weights come from ckpt_path.
        check_resume_compatible(cfg.ckpt_path, module.hparams.model, module.hparams.num_classes,
                                module.hparams.multilabel, {group: module.hparams[group] for group in RESUMED_GROUPS})
    elif cfg.model.init_from is not None:
        load_initial_weights(cfg, module)
    # weights_only: a resumed file was already read safely by check_resume_compatible; Lightning
    # reads it again the same way (tensors and plain containers only).
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SystemExit:
        # Lightning's answer to Ctrl-C, after its on_exception hooks (InterruptCheckpoint's checkpoint).
        if trainer.interrupted and trainer.is_global_zero:
            summarise(trainer, cfg, None)
        raise
    if not trainer.is_global_zero:
        return None
    heatmaps = save_heatmaps(module, datamodule, cfg)
    return summarise(trainer, cfg, heatmaps)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    # Hydra sweepers read the return value as the objective.
    return summary["best_score"] if summary else None


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
