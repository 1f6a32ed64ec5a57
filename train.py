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

from datamodules import DATAMODULES, ClassificationDataModule, build_datamodule
from evaluation.engine import validation_sample
from evaluation.explainers import build_explainer
from evaluation.figures import save_overlay_grid
from evaluation.panels import explanation_panels
from gcmodels.checkpoints import check_resume_compatible
from gcmodels.module import GCClassifier


def validation_metric(data_name: str) -> str:
    """The checkpointed validation score of data set ``data_name`` (``${validation_metric:...}``)."""
    if data_name not in DATAMODULES:
        raise ValueError(f"data.name={data_name!r} is unknown; allowed: {sorted(DATAMODULES)}")
    return GCClassifier.validation_metric(DATAMODULES[data_name].multilabel)


OmegaConf.register_new_resolver("validation_metric", validation_metric, replace=True)


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
        "output_stride": cfg.model.output_stride,
        "loss": cfg.loss.name,
        "lambda": cfg.loss.get("lambda"),
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


def run(cfg: DictConfig) -> dict | None:
    """Train as configured; returns the summary on the main process (None on other ranks)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    module = build_module(cfg, datamodule)
    if cfg.ckpt_path:
        check_resume_compatible(cfg.ckpt_path, module.hparams.model, module.hparams.num_classes,
                                module.hparams.multilabel)
    callbacks = [hydra.utils.instantiate(conf) for conf in cfg.callbacks.values()]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=build_loggers(cfg), callbacks=callbacks)
    # weights_only: a resumed file was already read safely by check_resume_compatible; Lightning
    # reads it again the same way (tensors and plain containers only).
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
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
