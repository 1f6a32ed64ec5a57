"""One evaluation pass of a network: accuracy, localisation (PG, SPG, CH), NQH and FGSM.

Shared by the checkpoint-evaluation script and the training callbacks, so both report the same
numbers. Each metric is a torchmetrics ``Metric``: under DDP every process evaluates its own
share of the images and ``compute()`` sums the counts over processes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score
from tqdm.auto import tqdm

from evaluation.metrics import (
    ContentHeatmap,
    FGSMRobustness,
    NegativeQuadrantsHeatmap,
    PointingGame,
    StochasticPointingGame,
)
from losses import make_composite, random_layout

METRICS = ("acc", "pg", "spg", "ch", "nqh", "fgsm")
LOCALIZATION_METRICS = ("pg", "spg", "ch")
DEFAULT_FGSM_EPS = (1, 2, 8, 16, 32, 64)


def check_metrics(metrics: Iterable[str]) -> list[str]:
    metrics = list(metrics)
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {list(METRICS)}")
    if not metrics:
        raise ValueError(f"no metric asked for; valid metrics: {list(METRICS)}")
    return metrics


def check_data_supports(datamodule, metrics: Sequence[str], data_name: str) -> None:
    """Refuse, before any work, localisation metrics on data without masks or boxes, and FGSM
    robustness (a top-1 accuracy) on multi-label data."""
    wanted = [name for name in metrics if name in LOCALIZATION_METRICS]
    if wanted and not getattr(datamodule, "has_localization", False):
        raise ValueError(
            f"metric(s) {wanted} need ground-truth object masks or boxes, and data {data_name!r} provides "
            "none; use data with masks (synthetic, coco, imagenet with data.box_dir) or drop these metrics"
        )
    if "fgsm" in metrics and datamodule.multilabel:
        raise ValueError(f"metric 'fgsm' is top-1 accuracy under attack, defined for single-label data; "
                         f"data {data_name!r} is multi-label")


def spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)``: validation sets are sorted by class,
    so a capped evaluation or a picture then still sees every class."""
    return torch.linspace(0, length - 1, min(count, length)).round().long().unique().tolist()


def validation_sample(datamodule, count: int) -> dict:
    """One batch of ``count`` validation images spread over the set."""
    loader = datamodule.val_dataloader()
    return loader.collate_fn([loader.dataset[i] for i in spread_indices(len(loader.dataset), count)])


def shard(dataset: Dataset, rank: int, world_size: int, max_images: int | None) -> Dataset:
    """This process's share (every ``world_size``-th item) of ``max_images`` items spread evenly
    over the set."""
    count = len(dataset) if max_images is None else max_images
    return Subset(dataset, spread_indices(len(dataset), count)[rank::world_size])


def _batches(loader: DataLoader, device: torch.device, description: str, progress: bool):
    for batch in tqdm(loader, desc=description, disable=not progress, leave=False):
        if batch["image"].numel():
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class ExplanationEvaluator:
    """Accumulates the asked metrics for one network and one explainer.

    ``explainer(net, images, classes) -> heatmaps [B, h, w]``. NQH explains composites built as in
    training (the image in a random cell, three distractors of other classes from the batch).
    ``tolerance`` is the pointing-game tolerance in pixels at 224 px (the papers' 15); it is scaled
    to the masks' size, ``tolerance * min(H, W) / 224``, so small images are not scored leniently.
    """

    def __init__(
        self,
        explainer: Callable,
        metrics: Sequence[str],
        num_classes: int,
        multilabel: bool = False,
        tolerance: float = 15,
        spg_samples: int = 100,
        spg_runs: int = 5,
        fgsm_eps: Sequence[float] = DEFAULT_FGSM_EPS,
        seed: int = 0,
    ):
        self.explainer = explainer
        self.metrics = check_metrics(metrics)
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.layout_generator = torch.Generator().manual_seed(seed)
        accuracy = (MultilabelF1Score(num_labels=num_classes, threshold=0.5, average="micro") if multilabel
                    else MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"))
        builders = {
            "acc": lambda: accuracy,
            "ch": lambda: ContentHeatmap(),
            "nqh": lambda: NegativeQuadrantsHeatmap(),
            "fgsm": lambda: FGSMRobustness(eps_list=tuple(fgsm_eps)),
        }
        self.state = {name: builders[name]() for name in self.metrics if name in builders}
        # PG and SPG are built at the first localisation batch, when the mask size is known.
        self.pending_pointing = [name for name in ("pg", "spg") if name in self.metrics]
        self.pointing_options = dict(tolerance=tolerance, num_classes=num_classes, spg_samples=spg_samples,
                                     spg_runs=spg_runs, seed=seed)

    @property
    def accuracy_name(self) -> str:
        return "f1" if self.multilabel else "acc"

    def to(self, device: torch.device) -> "ExplanationEvaluator":
        self.state = {name: metric.to(device) for name, metric in self.state.items()}
        return self

    def update_classification(self, net, batch: dict) -> None:
        images, targets = batch["image"], batch["target"]
        if "acc" in self.state:
            with torch.no_grad():
                logits = net(images)
            self.state["acc"].update(logits, targets.long() if self.multilabel else targets)
        if "fgsm" in self.state:
            self.state["fgsm"].update(net, images, targets)
        if "nqh" in self.state:
            layout = random_layout(targets, self.num_classes, self.layout_generator)
            keep = layout.valid.nonzero().squeeze(1)
            if keep.numel():
                kept = layout.select(layout.valid)
                composites = make_composite(images, keep, kept)
                # A composite has 4 images' pixels: explained a quarter batch at a time, a pass holds
                # no more than the batch the user sized, and on CPU runs about twice as fast (less
                # freshly mapped memory; ResNet18, 448 px, 32 composites per pass against 8).
                per_pass = max(1, len(images) // 4)
                maps = torch.cat([self.explainer(net, part, positive) for part, positive in
                                  zip(composites.split(per_pass), kept.positive.split(per_pass))])
                self.state["nqh"].update(maps, kept.cells)

    def _build_pointing_games(self, mask_size: tuple[int, int], device: torch.device) -> None:
        options = self.pointing_options
        tolerance = options["tolerance"] * min(mask_size) / 224
        builders = {
            "pg": lambda: PointingGame(tolerance=tolerance, num_classes=options["num_classes"]),
            "spg": lambda: StochasticPointingGame(tolerance=tolerance, num_samples=options["spg_samples"],
                                                  num_runs=options["spg_runs"], seed=options["seed"]),
        }
        for name in self.pending_pointing:
            self.state[name] = builders[name]().to(device)
        self.pending_pointing = []

    def update_localization(self, net, batch: dict) -> None:
        if self.pending_pointing:
            self._build_pointing_games(tuple(batch["mask"].shape[-2:]), batch["mask"].device)
        wanted = [name for name in LOCALIZATION_METRICS if name in self.state]
        if not wanted:
            return
        heatmaps = self.explainer(net, batch["image"], batch["target"])
        for name in wanted:
            if name == "pg":
                self.state[name].update(heatmaps, batch["mask"], classes=batch["target"])
            else:
                self.state[name].update(heatmaps, batch["mask"])

    def compute(self) -> dict:
        """Numbers in percent; ``skipped`` counts images left out (all-zero heatmap, empty mask)."""
        results: dict = {"skipped": {}}
        for name, metric in self.state.items():
            value = metric.compute()
            if name == "acc":
                results[self.accuracy_name] = 100.0 * float(value)
                continue
            if name == "fgsm":
                results["fgsm"] = {key: float(v) for key, v in value.items()}
                continue
            for key, number in value.items():
                if key == "skipped":
                    results["skipped"][name] = int(number)
                else:
                    results[key] = float(number)
        return results

    def run(self, net, datamodule, max_images: int | None = None, batch_size: int = 32, rank: int = 0,
            world_size: int = 1, progress: bool = True, num_workers: int = 0) -> dict:
        """Evaluate ``net`` on ``datamodule``'s validation data (and its localisation trials)."""
        device = next(net.parameters()).device
        self.to(device)
        was_training = net.training
        net.eval()
        try:
            if any(name in self.metrics for name in ("acc", "nqh", "fgsm")):
                val_set = datamodule.val_dataloader().dataset
                loader = DataLoader(shard(val_set, rank, world_size, max_images), batch_size=batch_size,
                                    num_workers=num_workers, collate_fn=datamodule.val_dataloader().collate_fn)
                for batch in _batches(loader, device, "classification, NQH, FGSM", progress):
                    self.update_classification(net, batch)
            if any(name in self.metrics for name in LOCALIZATION_METRICS):
                trials = datamodule.localization_dataset()
                loader = DataLoader(shard(trials, rank, world_size, max_images), batch_size=batch_size,
                                    num_workers=num_workers)
                for batch in _batches(loader, device, "localisation", progress):
                    self.update_localization(net, batch)
            return self.compute()
        finally:
            net.train(was_training)
