"""What every architecture provides: a classifier split at the layer Grad-CAM explains,
``normalize -> features -> head``, its options and the registry of architectures.

The split makes the explained layer explicit: ``features(x)`` returns the activations ``A``
(ResNet: ``layer4`` output; AlexNet and VGG: the last convolution's ReLU; ConvNeXt: the last stage;
ViT: the tokens entering the last block) and ``head(A)`` returns the logits. Images enter in pixel
space ([0, 1]); normalisation is the network's first step, so composites and adversarial
perturbations (FGSM) are built in pixel space.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    """A classifier whose explained layer is the output of ``features``.

    ``to_grid(A, image_size)`` gives the explained activations as ``[B, C, h, w]``: ``A`` itself for
    a convolutional network; a transformer's ``features`` return its tokens, which its head needs
    whole (the class token), and its subclass turns the patch tokens into the grid."""

    def __init__(self, features: nn.Module, head: nn.Module, normalize: nn.Module | None = None):
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.features = features
        self.head = head

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    def to_grid(self, activations: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """The explained activations ``[B, C, h, w]`` of images of ``image_size`` (height, width)."""
        return activations


@contextlib.contextmanager
def second_order_graph(enabled: bool = True) -> Iterator[None]:
    """Forward passes whose graph will be differentiated twice (``create_graph=True``): scaled
    dot-product attention on its math kernel, the one whose backward is itself differentiable
    (PyTorch's fused kernels, flash and memory-efficient, have no double backward). Elsewhere the
    fused kernels stay: they are faster and leaner. No effect on networks without attention."""
    if not enabled:
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class ModelOptions(Options):
    """The ``model`` group, what every architecture takes. ``pooling``: global average (``avg``) or
    max (``max``, GMP) pooling before the classifier, where the architecture has one to swap;
    ``output_stride``: input pixels per cell of the explained layer (None: the architecture's own);
    ``init_from``: a checkpoint whose network weights the run starts from (train.py)."""

    pooling: Literal["avg", "max"]
    pretrained: bool
    output_stride: int | None = None
    init_from: str | None = None


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: ``build(num_classes, pretrained=..., **options)`` makes the
    :class:`ExplainableNet`; ``native_stride(options)`` is its explained layer's input pixels per
    cell when ``output_stride`` is None."""

    build: Callable[..., ExplainableNet]
    native_stride: Callable[[Mapping[str, Any]], int]

    def __call__(self, num_classes: int, **options: Any) -> ExplainableNet:
        return self.build(num_classes, **options)


# The architectures by config name (``model.name``), each registered in its family's module.
ARCHITECTURES = Registry("model")

# What the model group holds besides the network's own options.
_RUN_KEYS = ("name", "init_from")


def build_network(name: str, num_classes: int, **options: Any) -> ExplainableNet:
    """Build ``name`` with ``num_classes`` outputs and its ``options`` (the ``model`` group's,
    validated by the entry point; those left out take the architecture's defaults).
    ``pretrained=True`` loads torchvision's ImageNet weights (from the local torch cache or a
    download) and replaces the last layer when the class count differs."""
    return ARCHITECTURES[name].build(num_classes, **options)


def network_from_config(model: Mapping[str, Any], num_classes: int, pretrained: bool | None = None) -> ExplainableNet:
    """The network a ``model`` config group describes; ``pretrained`` overrides the group's (False:
    the modules and shapes alone, e.g. to rebuild a checkpoint whose weights are loaded next)."""
    options = {key: value for key, value in model.items() if key not in _RUN_KEYS}
    if pretrained is not None:
        options["pretrained"] = pretrained
    return build_network(model["name"], num_classes, **options)


def network_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The options that decide what a network computes: the group less ``pretrained`` and
    ``init_from`` (where its weights come from)."""
    return {key: value for key, value in model.items() if key not in ("pretrained", "init_from")}


def explained_stride(model: Mapping[str, Any]) -> int:
    """Input pixels per cell of the explained layer of the network ``model`` (a config group)
    describes: its ``output_stride``, or the architecture's own."""
    stride = model.get("output_stride")
    if stride is not None:
        return stride
    return ARCHITECTURES[model["name"]].target.native_stride(model)
