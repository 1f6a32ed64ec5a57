"""Explanations turned into pictures' panels: the one path from (network, explainer, batch) to
what ``evaluation.figures`` draws, for train.py's final picture, the callback's overlays and the
evaluation script's heatmaps."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.images import labelled_classes
from evaluation.evaluator import Explainer
from evaluation.figures import Panel
from losses import make_composite, random_layout


def explanation_panels(net: torch.nn.Module, explainer: Explainer, batch: dict, class_names: Sequence[str],
                       composites: int = 0, generator: torch.Generator | None = None) -> list[Panel]:
    """One panel per image of ``batch``: its explanation for its labelled class, captioned with that
    class and the prediction, with the batch's ``mask`` outlined if it has one; then up to
    ``composites`` 2x2 composites (as NQH builds them, from ``generator``) with their explanation
    for the class of the image in the captioned cell."""
    device = next(net.parameters()).device
    images, targets = batch["image"].to(device), batch["target"].to(device)
    classes = labelled_classes(targets)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            predicted = net(images).argmax(1)
        masks = batch["mask"] if "mask" in batch else [None] * len(images)
        panels = [Panel(image, heat, f"{class_names[int(c)]}\npred: {class_names[int(p)]}", mask)
                  for image, heat, c, p, mask in zip(images, explainer(net, images, classes), classes, predicted,
                                                     masks)]
        if composites > 0:
            layout = random_layout(targets, len(class_names), generator).valid_subset()
            layout = layout.select(torch.arange(min(composites, len(layout)), device=device))
            pictures = make_composite(images, layout)
            panels += [Panel(picture, heat, f"composite: {class_names[int(c)]}\nin cell {int(k)}")
                       for picture, heat, c, k in zip(pictures, explainer(net, pictures, layout.classes),
                                                      layout.classes, layout.cells)]
    finally:
        net.train(was_training)
    return panels
