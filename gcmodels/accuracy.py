"""Classification scores shared by training (the module's ``val/acc`` / ``val/f1``) and the
evaluation's accuracy metric: top-1 accuracy, or micro and per-class F1 on multi-label data."""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score


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
