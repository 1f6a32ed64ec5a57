"""Evaluate checkpoints: ``python -m evaluation ckpt_path=PATH [data=...] [explainer=...] [metrics=[...]]``.

Writes report.md, report.csv, report.json, heatmaps.png and, with faithfulness metrics,
faithfulness.png (their mean curves) to the output dir. The config is
validated first, against :func:`evaluate_schema` (every refused key at once); then the rules across
objects (each checkpoint's class set against the data's, the explainer's layer on each network, the
metrics the data can serve, the device) before any data is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import BeforeValidator, Field, create_model

from datamodules import DATASETS, ClassificationDataModule, build_datamodule
from evaluation.distributed import start_processes
from evaluation.evaluator import ExplanationEvaluator
from evaluation.explainers import EXPLAINERS, Explainer, build_explainer
from evaluation.figures import save_faithfulness_curves, save_overlay_grid
from evaluation.metrics.registry import MetricNames, family_members
from evaluation.panels import explanation_panels
from evaluation.preflight import check_checkpoint_explainer, check_trained_classes, unsupported_metrics
from evaluation.report import REFERENCE_LABELS, reference_results, write_reports
from evaluation.sampling import validation_sample
from evaluation.settings import EvaluationSettings
from gcmodels.checkpoints import checkpoint_label, describe_checkpoint, read_hparams
from gcmodels.config import check_config
from gcmodels.module import GCClassifier
from gcmodels.options import Options, Sequence

Count = Annotated[int, Field(ge=0)]


def one_or_more(value):
    """``ckpt_path``: one path, or a list of them."""
    return (value,) if isinstance(value, str) else value


# The checkpoints, as a tuple of at least one path.
CheckpointPaths = Annotated[Sequence[Annotated[str, Field(min_length=1)]], Field(min_length=1),
                            BeforeValidator(one_or_more)]


def evaluate_schema() -> type[Options]:
    """The schema of ``conf/evaluate.yaml``, of the kinds registered now (a test may register more)."""
    return create_model(
        "EvaluateConfig", __base__=Options,
        data=(DATASETS.union(), ...),
        evaluation=(EvaluationSettings, ...),
        explainer=(EXPLAINERS.union(), ...),
        ckpt_path=(CheckpointPaths, ...),
        metrics=(MetricNames, ...),
        # None: every validation image.
        max_images=(Annotated[int, Field(ge=1)] | None, ...),
        device=(str, ...),
        devices=(Annotated[int, Field(ge=1)], ...),
        num_nodes=(Annotated[int, Field(ge=1)], ...),
        seed=(Count, ...),
        heatmap_images=(Count, ...),
        heatmap_composites=(Count, ...),
        output_dir=(str, ...),
    )


def check_checkpoint(path: Path, datamodule: ClassificationDataModule, explainer: Explainer) -> dict:
    """The checkpoint's hyper-parameters, after checking that it was trained on the data's classes
    and that the explainer's options fit its network."""
    hparams = read_hparams(path)
    check_trained_classes(path, hparams, datamodule)
    check_checkpoint_explainer(explainer, path, hparams)
    return hparams


def run(cfg: DictConfig) -> dict:
    options = check_config(cfg, evaluate_schema())
    metrics = list(options.metrics)
    explainer_options = OmegaConf.to_container(cfg.explainer, resolve=True)
    explainer = build_explainer(**explainer_options)
    explainer_name = explainer_options["name"]
    paths = [Path(path) for path in options.ckpt_path]
    settings: EvaluationSettings = options.evaluation
    datamodule = build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    hparams = [check_checkpoint(path, datamodule, explainer) for path in paths]
    fabric = start_processes(options.device, options.devices, options.num_nodes)
    device, rank, world_size = fabric.device, fabric.global_rank, fabric.world_size
    lead = rank == 0

    with fabric.rank_zero_first():  # the synthetic data is generated once
        datamodule.prepare_data()
    unsupported = unsupported_metrics(datamodule, metrics, settings.trial_geometry)
    if unsupported:
        raise ValueError("; ".join(f"metric {name!r} {reason}" for name, reason in unsupported.items()))
    datamodule.setup("validate")
    rows, grid = [], []
    for path, saved in zip(paths, hparams):
        row = describe_checkpoint(path, saved)
        net = GCClassifier.from_checkpoint(path).net.to(device, memory_format=settings.memory_format).eval()
        if lead:
            print(f"evaluating {path} ({row['model']}, loss={row['loss']}) with {explainer_name} "
                  f"in {world_size} process(es)")
        evaluator = ExplanationEvaluator(explainer, metrics, datamodule.num_classes, datamodule.multilabel, settings)
        # Each process scores its shard of the images; compute() reduces the states over all.
        row["results"] = evaluator.run(net, datamodule, max_images=options.max_images, rank=rank,
                                       world_size=world_size, progress=lead)
        rows.append(row)
        if lead and options.heatmap_images > 0:
            panels = explanation_panels(net, explainer, validation_sample(datamodule, options.heatmap_images),
                                        datamodule.class_names, options.heatmap_composites,
                                        torch.Generator().manual_seed(settings.seed))
            grid.append((f"{checkpoint_label(row)}\n{path.name}", panels))
    if not lead:  # rank 0 alone writes the reports and figures
        return {"rows": rows, "reports": {}}
    run_settings = {"explainer": explainer_name, "explainer_options": explainer_options, "data": datamodule.name,
                    "metrics": metrics, "max_images": options.max_images, "processes": world_size,
                    **settings.to_dict()}
    if family_members(metrics, "localization"):
        # Where a data set falls back from segmentations to boxes, the report says for how many.
        trials = datamodule.localization_dataset(settings.trial_geometry)
        run_settings["masks"] = getattr(trials, "mask_source", None)
    reports = write_reports(rows, options.output_dir, run_settings)
    curves = [(checkpoint_label(row), row["results"], False) for row in rows]
    # The reference maps' curves do not depend on the model: the first checkpoint's stand for all.
    curves += [(f"reference: {label}", reference_results(rows[0]["results"], reference), True)
               for reference, label in REFERENCE_LABELS.items()]
    figure = save_faithfulness_curves(curves, Path(options.output_dir, "faithfulness.png"),
                                      settings.faithfulness_score)
    if figure is not None:
        reports["faithfulness"] = figure
    if grid:
        reports["heatmaps"] = save_overlay_grid(grid, Path(options.output_dir, "heatmaps.png"),
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
