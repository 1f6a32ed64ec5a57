"""Train a classifier with the Grad-CAM consistency loss (or plain CE): ``python train.py [overrides]``.

The whole config is validated (gcmodels.config) and every component built and checked together
(gcmodels.preflight) before any data is generated or read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info

from datamodules import ClassificationDataModule, build_datamodule
from evaluation.explainers import build_explainer
from evaluation.figures import save_overlay_grid
from evaluation.panels import explanation_panels
from evaluation.sampling import validation_sample
from gcmodels.callbacks import InterruptCheckpoint, NonFiniteGuard
from gcmodels.checkpoints import RESUMED_GROUPS, check_resume_compatible, init_from_checkpoint
from gcmodels.config import check_config, train_schema
from gcmodels.module import GCClassifier
from gcmodels.preflight import check_writable, preflight


def build_module(cfg: DictConfig, datamodule: ClassificationDataModule) -> GCClassifier:
    def group(name: str) -> dict:
        return OmegaConf.to_container(cfg[name], resolve=True)

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
        "best_score": (float(checkpoint.best_model_score)
                       if checkpoint and checkpoint.best_model_score is not None else None),
        "last_checkpoint": str(last) if last else None,
        "nonfinite_skipped": guard.skipped if guard else None,
        "heatmaps": str(heatmaps) if heatmaps else None,
        "output_dir": cfg.output_dir,
    }
    Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [(key, summary[key]) for key in ("status", "model", "pooling", "init_from", "loss", "lambda", "data",
                                            "epochs", "global_step", "nonfinite_skipped")]
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


def build_run(cfg: DictConfig) -> tuple[ClassificationDataModule, GCClassifier, pl.Trainer]:
    """The datamodule, module and trainer (with its callbacks and loggers) that ``cfg`` describes,
    every value and rule checked before any data is generated or read (ImageNet and COCO read only
    their class names, which the module needs)."""
    check_config(cfg, train_schema(), targets=("callbacks", "logger"))
    check_writable(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    if cfg.model.init_from is not None:
        # Recorded absolute in the checkpoints, so that the record names the file from anywhere.
        cfg.model.init_from = str(Path(cfg.model.init_from).resolve())
    module = build_module(cfg, datamodule)
    callbacks = {name: hydra.utils.instantiate(conf) for name, conf in cfg.callbacks.items()}
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=build_loggers(cfg),
                                                  callbacks=list(callbacks.values()))
    preflight(cfg, datamodule, module, callbacks, trainer)
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict | None:
    """Train as configured; returns the summary on the main process (None on other ranks). Ctrl-C
    writes the summary (status interrupted) and exits as Lightning does, with status 1."""
    datamodule, module, trainer = build_run(cfg)
    module.objective.setup(datamodule, cfg.seed)
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
