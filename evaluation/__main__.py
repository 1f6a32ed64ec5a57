"""Evaluate checkpoints: ``python -m evaluation ckpt_path=PATH [data=...] [explainer=...] [metrics=[...]]``.

Writes report.md, report.csv, report.json and heatmaps.png to the output dir. Every input is
checked (image counts, paths, checkpoints and their class sets, metric and explainer names, the
explainer's layer on each network, settings) before any data is read.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules import ClassificationDataModule, build_datamodule
from datamodules.base import check_integer
from evaluation.engine import (ExplanationEvaluator, check_checkpoint_explainer, check_metrics, check_trained_classes,
                               resolve_device, unsupported_metrics, validation_sample)
from evaluation.explainers import Explainer, build_explainer
from evaluation.figures import save_overlay_grid
from evaluation.panels import explanation_panels
from evaluation.report import row_label, write_reports
from evaluation.settings import EvaluationSettings
from gcmodels.checkpoints import read_hparams
from gcmodels.module import GCClassifier

def checkpoint_paths(value) -> list[Path]:
    paths = [Path(p) for p in (value if isinstance(value, (list, ListConfig)) else [value])]
    if not paths:
        raise ValueError("ckpt_path: give at least one checkpoint")
    return paths


def check_options(cfg: DictConfig) -> None:
    """The counts of images evaluated and drawn, checked before anything is read."""
    if cfg.max_images is not None:
        check_integer("max_images", cfg.max_images, 1)
    check_integer("heatmap_images", cfg.heatmap_images, 0)
    check_integer("heatmap_composites", cfg.heatmap_composites, 0)


def check_checkpoint(path: Path, datamodule: ClassificationDataModule, explainer: Explainer) -> dict:
    """The checkpoint's hyper-parameters, after checking that it was trained on the data's classes
    and that the explainer's options fit its network."""
    hparams = read_hparams(path)
    check_trained_classes(path, hparams, datamodule)
    check_checkpoint_explainer(explainer, path, hparams)
    return hparams


def describe(path: Path, hparams: dict) -> dict:
    """A report row's description of a checkpoint: path, architecture, pooling, loss, lambda."""
    loss = hparams["loss"]
    return {"checkpoint": str(path), "model": hparams["model"]["name"], "pooling": hparams["model"]["pooling"],
            "loss": loss["name"], "lambda": loss.get("lambda")}


def run(cfg: DictConfig) -> dict:
    check_options(cfg)
    metrics = check_metrics(cfg.metrics)
    explainer_options = OmegaConf.to_container(cfg.explainer, resolve=True)
    explainer = build_explainer(**explainer_options)
    explainer_name = explainer_options["name"]
    paths = checkpoint_paths(cfg.ckpt_path)
    settings: EvaluationSettings = hydra.utils.instantiate(cfg.evaluation)
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    hparams = [check_checkpoint(path, datamodule, explainer) for path in paths]
    device = resolve_device(cfg.device)

    datamodule.prepare_data()
    unsupported = unsupported_metrics(datamodule, metrics, settings.trial_geometry)
    if unsupported:
        raise ValueError("; ".join(f"metric {name!r} {reason}" for name, reason in unsupported.items()))
    datamodule.setup("validate")
    rows, grid = [], []
    for path, saved in zip(paths, hparams):
        row = describe(path, saved)
        net = GCClassifier.from_checkpoint(path).net.to(device).eval()
        print(f"evaluating {path} ({row['model']}, loss={row['loss']}) with {explainer_name}")
        evaluator = ExplanationEvaluator(explainer, metrics, datamodule.num_classes, datamodule.multilabel, settings)
        row["results"] = evaluator.run(net, datamodule, max_images=cfg.max_images)
        rows.append(row)
        if cfg.heatmap_images > 0:
            panels = explanation_panels(net, explainer, validation_sample(datamodule, cfg.heatmap_images),
                                        datamodule.class_names, cfg.heatmap_composites,
                                        torch.Generator().manual_seed(settings.seed))
            grid.append((f"{row_label(row)}\n{path.name}", panels))
    run_settings = {"explainer": explainer_name, "explainer_options": explainer_options, "data": datamodule.name,
                    "metrics": metrics,
                    "max_images": cfg.max_images, **settings.to_dict()}
    reports = write_reports(rows, cfg.output_dir, run_settings)
    if grid:
        reports["heatmaps"] = save_overlay_grid(grid, Path(cfg.output_dir, "heatmaps.png"),
                                                f"{explainer_name} explanations of the labelled class")
    print(Path(reports["md"]).read_text())
    for name, path in reports.items():
        print(f"{name:<9} {path}")
    return {"rows": rows, "reports": {k: str(v) for k, v in reports.items()}}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
