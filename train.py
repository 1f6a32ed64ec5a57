"""Train a classifier with the Grad-CAM consistency loss (or plain CE): ``python train.py [overrides]``.

Every component is built, and so every config value checked, before any data is generated or read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.registry import datamodule_from_config
from gcmodels.checkpoints import check_resume_compatible
from gcmodels.module import GCClassifier
from evaluation.engine import validation_sample
from evaluation.figures import save_gradcam_grid

MODEL_KEYS = ("name", "pooling", "pretrained")


def build_module(cfg: DictConfig, datamodule) -> GCClassifier:
    return GCClassifier(
        model={key: cfg.model[key] for key in MODEL_KEYS},
        num_classes=datamodule.num_classes,
        multilabel=datamodule.multilabel,
        loss=cfg.loss.name,
        lam=cfg.loss["lambda"],
        cam_mode=cfg.loss.cam_mode,
        detach_target=cfg.loss.detach_target,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        layout_seed=cfg.seed,
    )


def build_loggers(cfg: DictConfig) -> list:
    if "wandb" in cfg.logger:
        # Never needs a network or an account unless the user asks for it with WANDB_MODE.
        os.environ.setdefault("WANDB_MODE", "offline")
    return [hydra.utils.instantiate(conf) for conf in cfg.logger.values()]


def summarise(trainer: pl.Trainer, cfg: DictConfig, heatmaps: Path | None) -> dict:
    checkpoint = trainer.checkpoint_callback
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    summary = {
        "model": cfg.model.name,
        "pooling": cfg.model.pooling,
        "loss": cfg.loss.name,
        "lambda": float(cfg.loss["lambda"]),
        "data": cfg.data.name,
        "epochs": trainer.current_epoch,
        "metrics": metrics,
        "best_checkpoint": checkpoint.best_model_path if checkpoint else None,
        "best_score": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None,
        "last_checkpoint": checkpoint.last_model_path if checkpoint else None,
        "heatmaps": str(heatmaps) if heatmaps else None,
        "output_dir": cfg.output_dir,
    }
    Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [(key, summary[key]) for key in ("model", "pooling", "loss", "lambda", "data", "epochs")]
    rows += [(name, f"{value:.4f}") for name, value in sorted(metrics.items()) if name.startswith(("val/", "explain/"))]
    rows += [(key, summary[key]) for key in ("best_checkpoint", "last_checkpoint", "heatmaps", "output_dir")]
    width = max(len(name) for name, _ in rows)
    print("\n" + "=" * 30 + " training summary " + "=" * 30)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return summary


def save_heatmaps(module: GCClassifier, datamodule, cfg: DictConfig) -> Path | None:
    count = int(cfg.heatmap_images)
    if count <= 0:
        return None
    batch = validation_sample(datamodule, count)
    images, targets = batch["image"], batch["target"]
    classes = targets if targets.dim() == 1 else targets.float().argmax(1)
    path = Path(cfg.output_dir, "heatmaps.png")
    save_gradcam_grid(module.net.cpu().eval(), images, classes, path, mode=cfg.loss.cam_mode,
                      class_names=getattr(datamodule, "class_names", None))
    return path


def run(cfg: DictConfig) -> dict | None:
    """Train as configured; returns the summary on the main process (None on other ranks)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = datamodule_from_config(OmegaConf.to_container(cfg.data, resolve=True))
    module = build_module(cfg, datamodule)
    if cfg.ckpt_path:
        check_resume_compatible(cfg.ckpt_path, module.hparams.model, module.hparams.num_classes,
                                module.hparams.multilabel)
    callbacks = [hydra.utils.instantiate(conf) for conf in cfg.callbacks.values()]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=build_loggers(cfg), callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
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
