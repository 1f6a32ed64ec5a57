"""Classifiers split at the layer Grad-CAM explains: ``normalize -> features -> head``.

The split makes the explained layer explicit: ``features(x)`` returns the activations ``A``
(ResNet: ``layer4`` output; AlexNet: conv5 after its ReLU) and ``head(A)`` returns the logits.
Images enter in pixel space ([0, 1]); normalisation is the network's first step, so composites
and adversarial perturbations (FGSM) are built in pixel space.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn
from torchvision import models

from gcmodels.options import Options, Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel affine normalisation as a module, so it is part of the differentiable graph."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ExplainableNet(nn.Module):
    """A classifier whose explained layer is the output of ``features``."""

    def __init__(self, features: nn.Module, head: nn.Module, normalize: nn.Module | None = None):
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.features = features
        self.head = head

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


# ResNet output stride -> how many of the last stages (layer4, then layer3) lose their stride 2.
UNSTRIDED_STAGES = {32: 0, 16: 1, 8: 2}
ALEXNET_STRIDE = 16


def _remove_stride(stages: list[nn.Sequential]) -> None:
    """Turn the stride 2 of each stage into dilation (DeepLab's atrous ResNet): the convolution that
    had the stride keeps the dilation before it, every 3x3 convolution after it doubles it, so each
    output at the old stride's positions sees exactly the pixels it saw before (same weights, same
    receptive fields, finer output). For ResNet50 this is torchvision's
    ``replace_stride_with_dilation``; torchvision refuses ResNet18's BasicBlock, whose stride sits
    in the block's first convolution rather than its middle one, hence this function."""
    dilation = 1
    for stage in stages:
        previous, dilation = dilation, dilation * 2
        rate = previous
        for conv in stage.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            strided = conv.stride == (2, 2)
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (rate, rate), (rate, rate)
                if strided:  # the convolutions after this one work on the finer grid
                    rate = dilation


def _resnet(arch: str, num_classes: int, pooling: str, pretrained: bool, output_stride: int) -> ExplainableNet:
    builder = getattr(models, arch)
    weights = "DEFAULT" if pretrained else None
    net = builder(weights=weights)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    unstrided = UNSTRIDED_STAGES[output_stride]
    _remove_stride(stages[len(stages) - unstrided:] if unstrided else [])
    if net.fc.out_features != num_classes:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    features = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    # GMP (paper): global max instead of global average pooling before fc; same weights otherwise.
    pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
    head = nn.Sequential(pool, nn.Flatten(1), net.fc)
    return ExplainableNet(features, head, Normalize())


def _alexnet(num_classes: int, pooling: str, pretrained: bool, output_stride: int) -> ExplainableNet:
    net = models.alexnet(weights="DEFAULT" if pretrained else None)
    if net.classifier[-1].out_features != num_classes:
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    # features[:-1] ends with conv5's ReLU (13x13 at 224 px); its last max-pool moves to the head.
    features = net.features[:-1]
    head = nn.Sequential(net.features[-1], net.avgpool, nn.Flatten(1), net.classifier)
    return ExplainableNet(features, head, Normalize())


class ModelOptions(Options):
    """The ``model`` group. ``output_stride``: input pixels per cell of the explained layer (None:
    the architecture's own, :func:`native_output_stride`); ``init_from``: a checkpoint whose
    network weights the run starts from (train.py)."""

    # avg: global average pooling (torchvision); max: global max pooling (GMP).
    pooling: Literal["avg", "max"]
    pretrained: bool
    output_stride: Literal[tuple(UNSTRIDED_STAGES)] | None = None
    init_from: str | None = None


class AlexNetOptions(ModelOptions):
    # AlexNet has no global pooling to swap for GMP: its head is maxpool + 6x6 adaptive pool + MLP.
    pooling: Literal["avg"]
    # conv5 is at stride 16, fixed: the option dilates a ResNet's last stages.
    output_stride: Literal[ALEXNET_STRIDE] | None = None


# The architectures by config name (``model.name``): each builds (num_classes, pooling,
# pretrained, output_stride) -> ExplainableNet.
ARCHITECTURES = Registry("model")
ARCHITECTURES.register("resnet18", ModelOptions)(partial(_resnet, "resnet18"))
ARCHITECTURES.register("resnet50", ModelOptions)(partial(_resnet, "resnet50"))
ARCHITECTURES.register("alexnet", AlexNetOptions)(_alexnet)


def native_output_stride(name: str) -> int:
    """The architecture's own output stride: 16 for AlexNet's conv5, 32 for ResNet's layer4."""
    return ALEXNET_STRIDE if name == "alexnet" else 32


def build_network(
    name: str, num_classes: int, pooling: str = "avg", pretrained: bool = False, output_stride: int | None = None
) -> ExplainableNet:
    """Build ``name`` with ``num_classes`` outputs; ``pretrained`` loads torchvision's ImageNet
    weights (from the local torch cache or a download) and replaces the last layer when the
    class count differs. ``output_stride``: input pixels per cell of the explained layer (None:
    the architecture's own, 32 for ResNet, 16 for AlexNet; ResNet also takes 16 and 8). The
    options are the ``model`` group's, validated by the entry point (:class:`ModelOptions`)."""
    if output_stride is None:
        output_stride = native_output_stride(name)
    return ARCHITECTURES[name].build(num_classes, pooling, pretrained, output_stride)
