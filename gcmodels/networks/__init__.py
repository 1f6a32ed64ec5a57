"""The classifiers, split at the layer Grad-CAM explains (:mod:`.base`), one module per family:
:mod:`.resnet` (ResNet18/50), :mod:`.convolutional` (AlexNet, VGG16, ConvNeXt-T), :mod:`.vit`
(vision transformers). Each registers its architectures in :data:`ARCHITECTURES` by config name
(``model.name``)."""
from . import convolutional, resnet, vit  # noqa: F401  (they register their architectures)
from .base import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Architecture,
    ExplainableNet,
    ModelOptions,
    Normalize,
    build_network,
    explained_stride,
    network_from_config,
    network_options,
    second_order_graph,
)
from .resnet import UNSTRIDED_STAGES

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "UNSTRIDED_STAGES",
    "Architecture",
    "ExplainableNet",
    "ModelOptions",
    "Normalize",
    "build_network",
    "explained_stride",
    "network_from_config",
    "network_options",
    "second_order_graph",
]
