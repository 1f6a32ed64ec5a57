"""Evaluate checkpoints: ``python -m evaluation ckpt_path=PATH [data=...] [explainer=...] [metrics=[...]]``.

Writes report.md, report.csv, report.json and heatmaps.png to the output dir. Every input is
checked (paths, checkpoints, class counts, metric and explainer names) before any evaluation.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.registry import datamodule_from_config
from evaluation.engine import ExplanationEvaluator, check_data_supports, check_metrics, validation_sample
from evaluation.explainers import build_explainer
from evaluation.figures import save_overlay_grid
from evaluation.report import row_label, write_reports
from gcmodels.checkpoints import read_hparams
from gcmodels.module import GCClassifier
from losses import make_composite, random_layout


def checkpoint_paths(value) -> list[Path]:
    paths = [Path(p) for p in (value if isinstance(value, (list, ListConfig)) else [value])]
    if not paths:
        raise ValueError("ckpt_path: give at least one checkpoint")
    return paths


def check_checkpoint(path: Path, num_classes: int, data_name: str) -> dict:
    """The checkpoint's hyper-parameters, after checking it fits the data."""
    hparams = read_hparams(path)
    if hparams.get("num_classes") != num_classes:
        raise ValueError(f"checkpoint {path} has {hparams.get('num_classes')} classes, but data "
                         f"{data_name!r} has {num_classes}")
    return hparams


def heatmap_panels(net, explainer, datamodule, count: int, generator: torch.Generator) -> list:
    """A few validation images with their explanations, and composites with theirs (for NQH)."""
    device = next(net.parameters()).device
    batch = validation_sample(datamodule, count)
    images, targets = batch["image"].to(device), batch["target"].to(device)
    classes = targets if targets.dim() == 1 else targets.float().argmax(1)
    names = getattr(datamodule, "class_names", None) or [str(k) for k in range(int(classes.max()) + 1)]
    panels = [(image, heat, names[int(c)]) for image, heat, c in zip(images, explainer(net, images, classes), classes)]
    layout = random_layout(targets, datamodule.num_classes, generator)
    first_two = layout.valid & (layout.valid.cumsum(0) <= 2)
    keep = first_two.nonzero().squeeze(1)
    if keep.numel():
        kept = layout.select(first_two)
        composites = make_composite(images, keep, kept)
        maps = explainer(net, composites, kept.positive)
        panels += [(c, m, f"composite: {names[int(p)]}\nin cell {int(k)}")
                   for c, m, p, k in zip(composites, maps, kept.positive, kept.cells)]
    return panels


def run(cfg: DictConfig) -> dict:
    metrics = check_metrics(cfg.metrics)
    explainer = build_explainer(cfg.explainer)
    paths = checkpoint_paths(cfg.ckpt_path)
    eps = [float(e) for e in cfg.fgsm.eps]
    if any(e <= 0 for e in eps):
        raise ValueError(f"fgsm.eps must be positive (in 1/255 units), got {eps}")
    data_config = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = datamodule_from_config(data_config)
    check_data_supports(datamodule, metrics, data_config["name"])
    hparams = [check_checkpoint(path, datamodule.num_classes, data_config["name"]) for path in paths]
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)

    datamodule.prepare_data()
    datamodule.setup("validate")
    rows, grid = [], []
    for path, saved in zip(paths, hparams):
        net = GCClassifier.from_checkpoint(path).net.to(device).eval()
        print(f"evaluating {path} ({saved['model']['name']}, loss={saved['loss']}) with {cfg.explainer}")
        evaluator = ExplanationEvaluator(
            explainer, metrics, datamodule.num_classes, datamodule.multilabel, tolerance=cfg.tolerance,
            spg_samples=cfg.spg.num_samples, spg_runs=cfg.spg.runs, fgsm_eps=eps, seed=cfg.seed,
        )
        results = evaluator.run(net, datamodule, max_images=cfg.max_images, batch_size=cfg.batch_size)
        row = {"checkpoint": str(path), **{k: saved["model"].get(k) for k in ("name", "pooling")},
               "loss": saved["loss"], "lambda": float(saved["lam"]), "results": results}
        row["model"] = row.pop("name")
        rows.append(row)
        if cfg.heatmap_images > 0:
            generator = torch.Generator().manual_seed(cfg.seed)
            grid.append((f"{row_label(row)}\n{path.name}",
                         heatmap_panels(net, explainer, datamodule, cfg.heatmap_images, generator)))
    settings = {"explainer": cfg.explainer, "data": data_config["name"], "metrics": metrics, "fgsm_eps": eps,
                "tolerance": cfg.tolerance, "spg": OmegaConf.to_container(cfg.spg), "max_images": cfg.max_images,
                "seed": cfg.seed}
    reports = write_reports(rows, cfg.output_dir, settings)
    if grid:
        reports["heatmaps"] = save_overlay_grid(grid, Path(cfg.output_dir, "heatmaps.png"),
                                                f"{cfg.explainer} explanations of the labelled class")
    print(Path(reports["md"]).read_text())
    for name, path in reports.items():
        print(f"{name:<9} {path}")
    return {"rows": rows, "reports": {k: str(v) for k, v in reports.items()}}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
