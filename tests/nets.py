"""Tiny networks for tests: no batch norm, so per-sample results do not depend on the batch."""
from __future__ import annotations

from torch import nn

from gcmodels.networks import ExplainableNet


def tiny_net(num_classes: int = 4, channels: int = 4, smooth: bool = True) -> ExplainableNet:
    """conv -> (tanh|relu) -> [explained layer] -> 1x1 conv -> tanh -> avg pool -> linear.

    The non-linear head makes dy/dA depend on A, so the second-order terms of the GC loss are
    not trivial; tanh keeps everything smooth for ``gradcheck``."""
    act = nn.Tanh if smooth else nn.ReLU
    features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), act())
    head = nn.Sequential(
        nn.Conv2d(channels, channels, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        nn.Linear(channels, num_classes),
    )
    return ExplainableNet(features, head)
